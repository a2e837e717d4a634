"""Rewrapping an RpcMethodHandler: what every interceptor that changes a handler's behaviour needs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


def rewrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Any], Any], *, parse: bool = True) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s streaming shape whose behaviour is ``wrap(behaviour)``, with its
    (de)serializers, or none with ``parse=False`` (a refusal need not parse a request it never
    reads). grpc has no such helper: each shape has its own constructor."""
    serde: dict[str, Any] = {}
    if parse:
        serde = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}  # fmt: skip
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **serde)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **serde)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **serde)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **serde)
