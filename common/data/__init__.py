"""Data, one concept per module: ``sources`` (and ``glue``) read a source into the common
table (``table``), ``labels`` turns raw labels into class ids or scores, ``partition`` writes
client shards and eval splits, ``tokens`` tokenises a split once (``instruct``: prompt/response
rows), ``batches`` feeds its token rows to training, ``cli`` is ``fedkrso-partition``."""

from __future__ import annotations

from .batches import batches, load_client_eval, load_split
from .labels import DataSourceError, Kind, encode_labels
from .partition import (
    Partition,
    PartitionInfo,
    make_partition,
    partition_indices,
    read_partition_info,
    save_partition,
    stratified_split,
)
from .sources import Columns, load_source
from .table import SourceData, instruction_dataset, to_dataset
from .tokens import TokenFormat, Tokens, tokenize

__all__ = [
    "Columns",
    "DataSourceError",
    "Kind",
    "Partition",
    "PartitionInfo",
    "SourceData",
    "TokenFormat",
    "Tokens",
    "batches",
    "encode_labels",
    "instruction_dataset",
    "load_source",
    "load_client_eval",
    "load_split",
    "make_partition",
    "partition_indices",
    "read_partition_info",
    "save_partition",
    "stratified_split",
    "to_dataset",
    "tokenize",
]
