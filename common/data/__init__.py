"""Data, one concept per module: ``sources`` (and ``glue``) read a source into the common
table (``table``), ``labels`` turns raw labels into class ids or scores, ``partition`` writes
client shards and eval splits, ``tokens`` tokenises a split once (``instruct``: prompt/response
rows), ``batches`` feeds its token rows to training, ``cli`` is ``fedkrso-partition``.

The names below load their module on first use (PEP 562), so ``fedkrso-partition --help``
answers before datasets and torch load. ``batches`` the function is imported from its module
(``from .data.batches import batches``): here the name is the module."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> the module of this package that defines it
_HOMES = {
    "load_client_eval": "batches", "load_split": "batches",
    "DataSourceError": "labels", "Kind": "labels", "encode_labels": "labels",
    "Partition": "partition", "PartitionInfo": "partition", "make_partition": "partition",
    "partition_indices": "partition", "read_partition_info": "partition", "save_partition": "partition",
    "stratified_split": "partition",
    "Columns": "sources", "load_source": "sources",
    "SourceData": "table", "instruction_dataset": "table", "to_dataset": "table",
    "TokenFormat": "tokens", "Tokens": "tokens", "tokenize": "tokens",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .batches import load_client_eval, load_split
    from .labels import DataSourceError, Kind, encode_labels
    from .partition import (Partition, PartitionInfo, make_partition, partition_indices, read_partition_info,
                            save_partition, stratified_split)
    from .sources import Columns, load_source
    from .table import SourceData, instruction_dataset, to_dataset
    from .tokens import TokenFormat, Tokens, tokenize
