"""``fedkrso-server`` without its byte-counting relay, for ``bench/scale.py --no-relay`` only.

Through the relay every client connection costs the server three file descriptors, so with
this machine's limit of 20,000 one server holds 6,581 clients. Serving gRPC directly (one
descriptor per connection) shows how the rest of the server behaves past that bound. It is an
experiment, not a deployment: without the relay there are no socket byte counts and no
per-address connection or pending-handshake limits (docs/HOSTILE.md)."""

from __future__ import annotations

from ..server.main import main

if __name__ == "__main__":
    main(count_bytes=False)
