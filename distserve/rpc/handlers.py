"""Wrapping a gRPC method handler: the one way the checks every server runs before a method (malformed
requests, API keys, callers' roles) are put in front of it, and the error table (rpc.errors) around
it, unary and streaming alike."""

from __future__ import annotations

import inspect

import grpc

from distserve.rpc.errors import abort


def before_handler(handler: grpc.RpcMethodHandler, check) -> grpc.RpcMethodHandler:
    """`handler` with `await check(request, context)` run first; check refuses a call by aborting it.
    Request-streaming methods get request=None (their messages arrive later)."""
    field = behaviour(handler)
    inner = getattr(handler, field)
    seen = (lambda request: None) if handler.request_streaming else (lambda request: request)

    if field.endswith("_stream") and inspect.isasyncgenfunction(inner):
        async def wrapped(request, context):
            await check(seen(request), context)
            async for item in inner(request, context):
                yield item
    else:  # one answer, or a stream written with context.write (health Watch)
        async def wrapped(request, context):
            await check(seen(request), context)
            result = inner(request, context)
            return await result if inspect.isawaitable(result) else result

    return handler._replace(**{field: wrapped})


def behaviour(handler: grpc.RpcMethodHandler) -> str:
    return next(f for f in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, f) is not None)


def with_error_table(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` whose raised errors abort the call with the error table's status. An abort the
    handler (or a check before it) made itself and task cancellation (the client went away) pass
    through untouched."""
    field = behaviour(handler)
    inner = getattr(handler, field)

    if field.endswith("_stream") and inspect.isasyncgenfunction(inner):
        async def wrapped(request, context):
            try:
                async for item in inner(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, exc)
    else:  # one answer, or a stream written with context.write (health Watch)
        async def wrapped(request, context):
            try:
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, exc)

    return handler._replace(**{field: wrapped})
