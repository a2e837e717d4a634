"""Authentication for every server: an interceptor checks the caller's secret before any handler runs.

Callers send ``authorization: Bearer <secret>``. The secret is either the cluster's internal
token (grants every method) or a client API key (grants the public methods). API keys are
stored as SHA-256 hex digests; a presented key is hashed and compared with every stored digest
in constant time, so neither timing nor the key file reveals a key.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from flywheel.common.rpc_handlers import rewrap

log = logging.getLogger(__name__)

# Methods anyone may call: probes and tooling must work without secrets.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
AUTH_HEADER = "authorization"


class Access(enum.Enum):
    OPEN = "open"
    PUBLIC = "public"  # API key or internal token
    INTERNAL = "internal"  # internal token only


@dataclass(frozen=True)
class ApiKey:
    client: str
    sha256_hex: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_secret(nbytes: int = 24) -> str:
    return secrets.token_urlsafe(nbytes)


def load_api_keys(path: str | Path) -> list[ApiKey]:
    """Reads '<client-name> <sha256-hex>' lines; '#' starts a comment. Raises ValueError naming the bad line."""
    keys: list[ApiKey] = []
    for number, raw in enumerate(Path(path).expanduser().read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        digest = parts[-1].lower()
        if len(parts) != 2 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(
                f"{path}:{number}: expected '<client-name> <sha256-hex-of-key>' "
                "(make one with: flywheel keys new NAME)"
            )
        keys.append(ApiKey(parts[0], digest))
    return keys


_PRINCIPAL: contextvars.ContextVar[tuple[Access, str] | None] = contextvars.ContextVar("principal", default=None)


def current_principal() -> tuple[Access, str] | None:
    """(access, client name) of the caller whose RPC the current thread is handling, as the auth
    interceptor established it; None when auth is disabled (or outside an RPC)."""
    return _PRINCIPAL.get()


def current_client(default: str = "anonymous") -> str:
    found = _PRINCIPAL.get()
    return found[1] if found else default


class Authenticator:
    """Decides who a caller is from its secret."""

    def __init__(self, internal_token: str, api_keys: Iterable[ApiKey], disabled: bool = False) -> None:
        self._internal_digest = hash_key(internal_token) if internal_token else ""
        self._keys = list(api_keys)
        self.disabled = disabled

    def principal(self, secret: str) -> tuple[Access, str] | None:
        """(highest access, client name) for a secret, or None when it matches nothing."""
        digest = hash_key(secret)
        # Compare against everything, without early exit, so timing does not depend on which matched.
        internal = bool(self._internal_digest) and hmac.compare_digest(digest, self._internal_digest)
        client = ""
        for key in self._keys:
            if hmac.compare_digest(digest, key.sha256_hex):
                client = key.client
        if internal:
            return Access.INTERNAL, "internal"
        if client:
            return Access.PUBLIC, client
        return None


def _abort_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as ``handler`` that only aborts."""

    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return rewrap(handler, lambda _behaviour: abort, parse=False)


def _with_principal(handler: grpc.RpcMethodHandler, principal: tuple[Access, str]) -> grpc.RpcMethodHandler:
    """The same handler, with ``current_principal()`` set while its behaviour runs. The interceptor
    runs on a different thread than the handler, so the identity has to travel with the handler."""

    def bind(behaviour: Any) -> Any:
        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            token = _PRINCIPAL.set(principal)
            try:
                return behaviour(request, context)
            finally:
                _PRINCIPAL.reset(token)

        def streaming(request: Any, context: grpc.ServicerContext) -> Any:
            token = _PRINCIPAL.set(principal)
            try:
                yield from behaviour(request, context)
            finally:
                _PRINCIPAL.reset(token)

        return streaming if handler.response_streaming else unary

    return rewrap(handler, bind)


class _Gate:
    """The decision both interceptors make: pass the handler through untouched (None), refuse it
    (status code, message) or run it as a principal (access, client)."""

    def __init__(self, authenticator: Authenticator, access_of: Callable[[str], Access]) -> None:
        self._auth = authenticator
        self._access_of = access_of

    def decide(
        self, method: str, metadata: Iterable[tuple[str, Any]] | None
    ) -> tuple[grpc.StatusCode, str] | tuple[Access, str] | None:
        if self._auth.disabled or method.startswith(OPEN_PREFIXES):
            return None
        required = self._access_of(method)
        if required is Access.OPEN:
            return None
        secret = ""
        for key, value in metadata or ():
            if key == AUTH_HEADER and isinstance(value, str) and value.startswith("Bearer "):
                secret = value[len("Bearer ") :].strip()
        if not secret:
            return grpc.StatusCode.UNAUTHENTICATED, f"{method} needs 'authorization: Bearer <key>' metadata"
        found = self._auth.principal(secret)
        if found is None:
            log.warning("rejected call to %s: unknown credentials", method)
            return grpc.StatusCode.UNAUTHENTICATED, "invalid API key or token"
        if required is Access.INTERNAL and found[0] is not Access.INTERNAL:
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} is internal: it needs the cluster's internal token, not an API key",
            )
        return found

    def guard(
        self,
        handler: grpc.RpcMethodHandler | None,
        details: grpc.HandlerCallDetails,
        refuse: Callable[[grpc.RpcMethodHandler, grpc.StatusCode, str], grpc.RpcMethodHandler],
        bind: Callable[[grpc.RpcMethodHandler, tuple[Access, str]], grpc.RpcMethodHandler],
    ) -> grpc.RpcMethodHandler | None:
        """``handler`` as the decision has it: untouched, ``refuse``-d or ``bind``-ed to its principal."""
        if handler is None:
            return None
        verdict = self.decide(details.method, details.invocation_metadata)  # type: ignore[attr-defined]
        if verdict is None:
            return handler
        if isinstance(verdict[0], grpc.StatusCode):
            return refuse(handler, verdict[0], verdict[1])  # type: ignore[arg-type]
        return bind(handler, verdict)  # type: ignore[arg-type]


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without a known secret (UNAUTHENTICATED) or whose API key does not grant an
    internal method (PERMISSION_DENIED)."""

    def __init__(self, authenticator: Authenticator, access_of: Callable[[str], Access]) -> None:
        self._gate = _Gate(authenticator, access_of)

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        return self._gate.guard(
            continuation(handler_call_details), handler_call_details, _abort_handler, _with_principal
        )


def _aio_abort_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """``_abort_handler`` for an asyncio server: the behaviour is a coroutine."""

    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    return rewrap(handler, lambda _behaviour: abort, parse=False)


def _aio_with_principal(handler: grpc.RpcMethodHandler, principal: tuple[Access, str]) -> grpc.RpcMethodHandler:
    """``_with_principal`` for an asyncio server. Each RPC runs in its own task, so the variable
    set here is seen by the handler and everything it awaits, and by no other RPC."""

    def bind(behaviour: Any) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _PRINCIPAL.set(principal)
            return await behaviour(request, context)

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            _PRINCIPAL.set(principal)
            async for response in behaviour(request, context):
                yield response

        return streaming if handler.response_streaming else unary

    return rewrap(handler, bind)


class AioAuthInterceptor(grpc.aio.ServerInterceptor):
    """``AuthInterceptor`` for an asyncio server (``grpc.aio``): same rules, same messages."""

    def __init__(self, authenticator: Authenticator, access_of: Callable[[str], Access]) -> None:
        self._gate = _Gate(authenticator, access_of)

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        return self._gate.guard(
            await continuation(handler_call_details), handler_call_details, _aio_abort_handler, _aio_with_principal
        )
