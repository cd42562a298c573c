"""Who is calling: transport security and client credentials, checked in one interceptor.

Three ways to know a client (``security`` in round.yaml):

* a tokens file: each client sends ``authorization: Bearer <token>`` on every RPC, Join
  included, and its id is the file's id; the file is re-read when it changes, so deleting a
  line revokes that client on its next RPC;
* ``client_id_from_cert``: under mutual TLS the id is the client certificate's subject CN;
* open enrolment (neither): Join is public and issues a random per-session bearer token for
  the id ``name``; a Join under the name of a live client must present that client's current
  session token (no takeover), and Leave ends the session. For loopback and trusted networks
  only.

The id always comes from the credential, never from a message body; a caller without a valid
credential gets UNAUTHENTICATED before any servicer code runs.
"""

from __future__ import annotations

import contextvars
import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import grpc
import structlog

from ..common.config import ConfigError, SecuritySection, address_host, is_loopback
from ..common.logs import bounded
from ..common.protocol import bearer_token, valid_client_id
from .statuses import rewrap

log = structlog.get_logger("fedkrso.server")
_CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("fedkrso_client", default=None)


def current_client() -> str | None:
    """The authenticated id of the RPC being served; None only for Join under open enrolment."""
    return _CLIENT.get()


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"security.{field}: cannot read {path}: {err.strerror}") from None


def server_credentials(sec: SecuritySection, listen: str) -> grpc.ServerCredentials | None:
    """TLS credentials for ``listen``, or None for plaintext.

    Plaintext is allowed on loopback or when ``insecure`` is asked for; anywhere else a server
    without TLS material refuses to start rather than expose tokens and weights."""
    if sec.insecure:
        return None
    if sec.tls_cert is None:
        if is_loopback(address_host(listen)):
            return None
        raise ConfigError(
            f"refusing to listen on {listen} without TLS: set security.tls_cert and security.tls_key, "
            "or security.insecure (fedkrso-server --insecure) on a trusted network"
        )
    ca = _read(sec.client_ca, "client_ca") if sec.client_ca else None
    return grpc.ssl_server_credentials(
        [(_read(sec.tls_key, "tls_key"), _read(sec.tls_cert, "tls_cert"))],
        root_certificates=ca, require_client_auth=ca is not None)


class SessionAuth:
    """Open enrolment: one random token per client id, replaced when that id joins again, so
    a client that re-joins under its name (e.g. after a server restart) keeps its id."""

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}  # token -> client id
        self._tokens: dict[str, str] = {}  # client id -> token

    def enrol(self, client_id: str) -> str:
        """A fresh session token for ``client_id`` (open enrolment); it replaces the client's previous one."""
        old = self._tokens.pop(client_id, None)
        if old is not None:
            del self._ids[old]
        token = secrets.token_urlsafe(24)
        self._ids[token], self._tokens[client_id] = client_id, token
        return token

    def lookup(self, token: str) -> str | None:
        """The client id a session token belongs to, or None."""
        return self._ids.get(token)

    def __len__(self) -> int:
        return len(self._tokens)

    def retain(self, client_ids) -> None:
        """Forget the sessions of every id not in ``client_ids`` (the client table forgot them)."""
        for client_id in [c for c in self._tokens if c not in client_ids]:
            self.revoke(client_id)

    def revoke(self, client_id: str) -> None:
        """End ``client_id``'s session (it left): its token no longer authenticates."""
        token = self._tokens.pop(client_id, None)
        if token is not None:
            del self._ids[token]


class TokenFile:
    """``client_id token`` per line, ``#`` comment lines; tokens are compared in constant time.

    The file is stat'ed on every lookup and re-read when its mtime, size or inode changes. A
    file that later becomes unreadable or malformed refuses everyone until it is fixed."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        try:
            self._entries = self._parse()
        except (OSError, ValueError) as err:
            raise ConfigError(f"security.tokens_file: {err}") from None

    def _parse(self) -> list[tuple[str, bytes]]:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        entries: list[tuple[str, bytes]] = []
        seen: set[str] = set()
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 2 or not valid_client_id(fields[0]) or fields[0] in seen:
                raise ValueError(f"{self.path} line {n}: expected a new `client_id token`")
            seen.add(fields[0])
            entries.append((fields[0], fields[1].encode()))
        self._stamp = stamp
        return entries

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
                return
            self._entries = self._parse()
            log.info("tokens_reloaded", path=str(self.path), clients=len(self._entries))
        except (OSError, ValueError) as err:
            self._stamp, self._entries = None, []
            log.error("tokens_file_invalid", path=str(self.path), error=str(err))

    def lookup(self, token: str) -> str | None:
        """The client id whose token in the file is ``token`` (re-read when the file changed), or None;
        compared in constant time over every entry."""
        self._refresh()
        presented = token.encode()
        found = None
        for client_id, known in self._entries:  # no early exit: timing says nothing about the file
            if hmac.compare_digest(known, presented):
                found = client_id
        return found


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Establishes the caller's id for every RPC (open-enrolment Join excepted) and makes it
    available to the servicer through ``current_client()``."""

    def __init__(self, sec: SecuritySection):
        self.tokens = TokenFile(sec.tokens_file) if sec.tokens_file else None
        self.from_cert = sec.client_id_from_cert
        self.sessions = SessionAuth()
        self._guarded_handlers: dict[tuple[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler] = {}

    @property
    def mode(self) -> str:
        """How callers are identified: ``tokens_file``, ``certificate`` (mutual TLS) or ``open_enrolment``."""
        return "tokens_file" if self.tokens else "certificate" if self.from_cert else "open_enrolment"

    def identify(self, context: grpc.aio.ServicerContext) -> tuple[str | None, str]:
        """(client id, "") or (None, why not)."""
        if self.from_cert:
            names = (context.auth_context() or {}).get("x509_common_name") or []
            cn = names[0].decode(errors="replace") if names else ""
            return (cn, "") if valid_client_id(cn) else (None, f"no valid client certificate CN ({bounded(cn)})")
        token = bearer_token(context.invocation_metadata())
        if token is None:
            return None, "missing bearer token"
        client_id = (self.tokens or self.sessions).lookup(token)
        return (client_id, "") if client_id else (None, "unknown or revoked token")

    async def _authenticate(self, context: grpc.aio.ServicerContext, method: str) -> None:
        client_id, reason = self.identify(context)
        if client_id is None:
            log.warning("credential_refused", client=context.peer(), method=method, reason=reason)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        _CLIENT.set(client_id)

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        """The handler of ``details.method``, guarded to run only for an identified caller (Join under
        open enrolment is not guarded)."""
        handler = await continuation(details)
        if handler is None or (self.mode == "open_enrolment" and details.method.endswith("/Join")):
            return handler
        key = (details.method, handler)  # one guarded handler per method, built once, not per call
        guarded = self._guarded_handlers.get(key)
        if guarded is None:
            guarded = self._guarded_handlers[key] = self._guarded(handler, details.method.rsplit("/", 1)[-1])
        return guarded

    def _guarded(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The same handler, authenticating first (all four streaming shapes)."""

        def around(inner: Callable, streaming: bool):
            if streaming:
                async def behavior(request, context):
                    await self._authenticate(context, method)
                    async for message in inner(request, context):
                        yield message
            else:
                async def behavior(request, context):
                    await self._authenticate(context, method)
                    return await inner(request, context)
            return behavior

        return rewrap(handler, around)


def check_security(sec: SecuritySection, listen: str) -> None:
    """Raise ConfigError now, before the model loads, for what would stop ``run_server``."""
    server_credentials(sec, listen)
    AuthInterceptor(sec)
