"""Data, one concept per module: ``sources`` (and ``glue``) read a source into the common
table (``table``), ``labels`` turns raw labels into class ids or scores, ``partition`` writes
client shards and eval splits, ``tokens`` tokenises a split once (``instruct``: prompt/response
rows), ``feed`` reads a split back and draws its token rows into training batches (``batches``),
``cli`` is ``fedkrso-partition``.

The names below load their module on first use (PEP 562), so importing this package, or
``fedkrso-partition --help``, does not load datasets or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# what a source is called on the command line (``sources.load_source`` reads each)
SOURCES_HELP = ("bbc | bbc-headlines | glue:<TASK> | csv:<path> | json:<path> | jsonl:<path> | "
                "parquet:<path> | hub:<name>[:<config>]")

_HOME = {
    "feed": ("batches", "load_client_eval", "load_split"),
    "labels": ("DataSourceError", "Kind", "encode_labels"),
    "partition": ("Partition", "PartitionInfo", "make_partition", "partition_indices", "read_partition_info",
                  "save_partition", "stratified_split"),
    "sources": ("Columns", "load_source"),
    "table": ("SourceData", "instruction_dataset", "to_dataset"),
    "tokens": ("TokenFormat", "Tokens", "tokenize"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}

__all__ = sorted(["SOURCES_HELP", *_MODULE_OF])


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and editors see: the same names, imported eagerly
    from .feed import batches, load_client_eval, load_split
    from .labels import DataSourceError, Kind, encode_labels
    from .partition import (Partition, PartitionInfo, make_partition, partition_indices, read_partition_info,
                            save_partition, stratified_split)
    from .sources import Columns, load_source
    from .table import SourceData, instruction_dataset, to_dataset
    from .tokens import TokenFormat, Tokens, tokenize
