"""Reaching Ray for ``fedkrso-sim --backend ray`` and ``fedkrso-bench --ray``, with nothing
heavy imported: a missing Ray, or no cluster at the address, is answered at once (exit 2,
naming the fix) rather than after the model loads, or after Ray retries for minutes.
"""

from __future__ import annotations

import socket

RAY_PIN = "ray==2.60.0"  # requirements.lock's


class RayUnavailable(RuntimeError):
    """Ray is not installed, or there is no cluster at the address: the message names the fix."""


def import_ray():
    """The ``ray`` module, imported here only (a run without ``--backend ray`` never needs it)."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"the Ray backend needs Ray: pip install {RAY_PIN} (make install does)") from None
    return ray


def connect(address: str | None, cpus: int | None = None):
    """Join the Ray cluster at ``address`` (``auto``: the one ``ray start`` made on this
    machine; ``HOST:PORT``: a head node's GCS), or start a local one when ``address`` is None.
    A driver that already joined one (a test, the bench) keeps it."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address not in (None, "auto"):
        _reachable(address)  # ray.init would retry an address with nobody there for minutes
    try:
        if address is None:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise RayUnavailable(f"no Ray cluster at {address!r} ({str(err).splitlines()[0][:200]}); start one with "
                             "`ray start --head` on the head node (docs/guides/simulate.md), or leave out "
                             "--address to start a local one") from None
    return ray


def _reachable(address: str, timeout: float = 5.0) -> None:
    """RayUnavailable unless something accepts a TCP connection at ``address`` (HOST:PORT,
    or ray://HOST:PORT)."""
    where = address.removeprefix("ray://")
    host, _, port = where.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as err:
        raise RayUnavailable(f"no Ray cluster at {address!r} ({err}); start one with `ray start --head` on the "
                             "head node (docs/guides/simulate.md), or leave out --address to start a local "
                             "one") from None


