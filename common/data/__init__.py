"""Data, one concept per module: ``sources`` reads a source into the common table, ``labels``
turns raw labels into class ids or scores, ``partition`` writes client shards and an eval
split, ``batches`` feeds a saved split to training, ``cli`` is ``fedkrso-partition``."""

from __future__ import annotations

from .batches import batches, encode, load_split
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
from .sources import SourceData, load_source, to_dataset

__all__ = [
    "DataSourceError",
    "Kind",
    "Partition",
    "PartitionInfo",
    "SourceData",
    "batches",
    "encode",
    "encode_labels",
    "load_source",
    "load_split",
    "make_partition",
    "partition_indices",
    "read_partition_info",
    "save_partition",
    "stratified_split",
    "to_dataset",
]
