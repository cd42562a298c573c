"""What both ends of the gRPC protocol agree on besides the messages themselves.

The messages are in ``proto/fedkrso/v1``; this module holds the metadata keys and the
software version that client and server exchange, so neither side imports the other.
"""

from __future__ import annotations

import re

VERSION = "0.1.0"
# A client id: it appears in paths, logs and metrics. ASCII letters, digits, "-" and "_".
CLIENT_ID_PATTERN = r"[A-Za-z0-9_-]{1,48}"



def valid_client_id(name: str) -> bool:
    """Whether ``name`` is a valid client id (``CLIENT_ID_PATTERN``: 1 to 48 ASCII letters, digits, '-'
    or '_')."""
    return re.fullmatch(CLIENT_ID_PATTERN, name) is not None


# Initial metadata of Join's answer under open enrolment: the session's bearer token.
TOKEN_HEADER = "x-fedkrso-token"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that presents ``token`` (``authorization: Bearer <token>``)."""
    return (("authorization", f"Bearer {token}"),)


def bearer_token(metadata) -> str | None:
    """The token of an ``authorization: Bearer`` entry in call metadata, if any."""
    for key, value in metadata or ():
        if key == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return None
