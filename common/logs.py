"""structlog set-up: key-value events, JSON when stderr is not a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(level: str = "info", json: bool | None = None) -> None:
    """Set up structlog at ``level``: JSON lines when ``json`` (default: when stderr is not a
    terminal), readable lines otherwise."""
    json = (not sys.stderr.isatty()) if json is None else json
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    quiet_libraries()


def quiet_libraries() -> None:
    """transformers is chatty about things users cannot act on (warnings and a progress bar per
    model load): errors only, no bars; and datasets draws its bars (saving, mapping) into log
    files: none where stderr is not a terminal. By their environment variables, read when they
    are imported, so a process that never loads a model (a bad config, ``--help``) does not
    import them (1.3 s with torch) just to quiet them; a variable the user set is kept."""
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if sys.stderr.isatty():
        return
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def progress(total: int, desc: str, unit: str = "it"):
    """A tqdm bar on stderr for a wait a person watches: shown on a terminal only (tqdm's
    ``disable=None``), so logs written to files and JSON log pipelines stay clean."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False)


def bounded(value: object, limit: int = 80) -> str:
    """A string the other side chose, made safe to log or echo: at most ``limit`` characters of
    its ``repr`` (quotes and escapes included, so control characters stay visible), then the
    length cut. A 1 MB Leave reason or name costs a log line of ~100 bytes."""
    text = repr(value) if isinstance(value, str) else repr(str(value))
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"
