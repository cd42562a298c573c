"""Label encoding: raw label values to class ids or regression scores, by one rule.

Every reader (csv, jsonl, the hub, GLUE's TSVs) hands its raw label column to
``encode_labels``, so a label means the same whichever file it came from and whichever reader
read it: integers are class ids, other numbers are scores, anything else is a class name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

Kind = Literal["classification", "regression", "text", "instruction"]


class DataSourceError(RuntimeError):
    """A source that cannot be read: missing package, file, column or network, or labels
    that are neither classes nor scores."""


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def encode_labels(
    values: list,
    names: Sequence[str] | None = None,
    kind: Literal["classification", "regression"] | None = None,
) -> tuple[Kind, list, list[str] | None]:
    """(kind, encoded labels, names) for a raw label column.

    ``kind`` is the source's word where it has one (GLUE knows STS-B is scored); otherwise the
    column decides: all integers (``3`` or ``"3"``) are class ids, else all numbers are
    regression scores, else every value is a class name. The column is read one way as a
    whole, so a ``"2"`` among names stays a name rather than becoming class 2.

    ``names`` fixes the classes when the source has them (GLUE's names, the hub's ClassLabel
    names, a dev split reusing its training split's); without it they are "0".."max" for ids
    and the sorted distinct values for names. A value outside the classes is refused rather
    than guessed, so a typo or an unlabelled row (-1) never becomes a class."""
    ids = [_as_int(v) for v in values]
    as_ids = bool(values) and all(i is not None for i in ids)
    if kind is None and not as_ids and values and all(_as_float(v) is not None for v in values):
        kind = "regression"
    if kind == "regression":
        scores = [_as_float(v) for v in values]
        unknown = sorted({str(v) for v, s in zip(values, scores) if s is None})
        if unknown:
            raise DataSourceError(f"scores {unknown[:5]} are not numbers")
        return "regression", scores, None
    if as_ids:
        names = list(names) if names else [str(i) for i in range(max(ids) + 1)]
        bad = sorted({i for i in ids if not 0 <= i < len(names)})
        if bad:
            hint = " (unlabelled rows?)" if bad[0] < 0 else ""
            raise DataSourceError(f"class ids {bad[:5]} are not ids of the classes {names}{hint}")
        return "classification", ids, names
    names = list(names) if names else sorted({str(v) for v in values})
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise DataSourceError(f"labels {unknown[:5]} are not among the classes {names}")
    return "classification", [index[str(v)] for v in values], names

