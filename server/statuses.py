"""Every RPC ends with a precise gRPC status, never UNKNOWN with a Python class name.

``StatusInterceptor`` wraps every handler: a ``RoundError`` (the service's refusals) becomes
its code and message with a ``request_refused`` log event; a request message that does not
decode is INVALID_ARGUMENT (gRPC alone would answer UNKNOWN); any other exception is logged
(``rpc_failed``, with its traceback) and answered INTERNAL with a message naming nothing of
the server's code. Aborts (``context.abort``) and cancellations pass through untouched.

``rewrap`` builds a handler of the same streaming shape around a new behaviour; the
authentication interceptor (``auth.py``) uses it too.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import structlog

from .rounds import RoundError

log = structlog.get_logger("fedkrso.server")


class Undecodable:
    """What the wrapped deserializer returns for bytes that are not a valid request."""

    def __init__(self, type_name: str):
        self.type_name = type_name

    def error(self) -> RoundError:
        """The refusal for a request that did not decode: INVALID_ARGUMENT naming the message type."""
        return RoundError("INVALID_ARGUMENT", f"a request message does not decode as {self.type_name}")


def _tolerant(deserializer: Callable | None, type_name: str) -> Callable | None:
    if deserializer is None:
        return None

    def decode(raw: bytes):
        try:
            return deserializer(raw)
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError and others
            return Undecodable(type_name)

    return decode


async def _decoded(requests):
    """A request stream that raises INVALID_ARGUMENT at its first undecodable message."""
    async for message in requests:
        if isinstance(message, Undecodable):
            raise message.error()
        yield message


def rewrap(handler: grpc.RpcMethodHandler, around: Callable, deserializer: Callable | None = None
           ) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour ``inner`` replaced by ``around(inner, streaming)``, which
    returns an async function (``streaming`` False) or an async generator function (True)
    of ``(request, context)``; serializers and streaming shape are kept unless
    ``deserializer`` replaces the request's."""
    streaming = handler.response_streaming
    if streaming:
        inner = handler.unary_stream or handler.stream_stream
    else:
        inner = handler.unary_unary or handler.stream_unary
    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(handler.request_streaming, streaming)]
    return make(around(inner, streaming), request_deserializer=deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer)


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps what a handler raises to a precise status (module docstring). ``client`` names
    the caller in log events (the authenticated id, when there is one)."""

    def __init__(self, client: Callable[[], str | None]):
        self.client = client
        self._wrapped: dict[tuple[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        """The handler of ``details.method``, wrapped so that a ``RoundError`` (or anything unexpected)
        ends the call with a precise status and a log event."""
        handler = await continuation(details)
        if handler is None:
            return None
        key = (details.method, handler)  # one wrapped handler per method, built once, not per call
        wrapped = self._wrapped.get(key)
        if wrapped is None:
            method = details.method.rsplit("/", 1)[-1]
            type_name = f"fedkrso.v1.{method}Request"
            streams = handler.request_streaming
            wrapped = rewrap(handler, lambda inner, streaming: self._streaming(inner, method, streams) if streaming
                             else self._unary(inner, method, streams),
                             _tolerant(handler.request_deserializer, type_name))
            self._wrapped[key] = wrapped
        return wrapped

    async def _refuse(self, context, method: str, err: Exception) -> None:
        if isinstance(err, RoundError):
            log.warning("request_refused", method=method, client=self.client(), code=err.code, reason=str(err))
            await context.abort(getattr(grpc.StatusCode, err.code), str(err))
        log.exception("rpc_failed", method=method, client=self.client(), error=type(err).__name__)
        await context.abort(grpc.StatusCode.INTERNAL, f"{method} failed on the server (logged there)")

    def _unary(self, inner: Callable, method: str, streams: bool):
        async def behavior(request, context):
            try:
                if isinstance(request, Undecodable):
                    raise request.error()
                return await inner(_decoded(request) if streams else request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as err:  # noqa: BLE001 - every exception gets a precise status
                await self._refuse(context, method, err)

        return behavior

    def _streaming(self, inner: Callable, method: str, streams: bool):
        async def behavior(request, context):
            try:
                if isinstance(request, Undecodable):
                    raise request.error()
                async for message in inner(_decoded(request) if streams else request, context):
                    yield message
            except grpc.aio.AbortError:
                raise
            except Exception as err:  # noqa: BLE001 - every exception gets a precise status
                await self._refuse(context, method, err)

        return behavior
