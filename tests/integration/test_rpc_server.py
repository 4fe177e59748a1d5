"""build_server (health, reflection, the error table on every method), ChannelPool, on real grpc.aio servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from distserve.errors import InvalidRequest, NotFound, ResourceExhausted
from distserve.rpc.channels import ChannelPool
from distserve.rpc.errors import error_from_rpc
from distserve.rpc.server import build_server
from distserve.v1 import kv_pb2, kv_pb2_grpc

pytestmark = pytest.mark.timeout(60)

KV_SERVICE = "distserve.v1.KvTransfer"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Failing(kv_pb2_grpc.KvTransferServicer):
    """Raises what the request id names, to exercise the error boundary."""

    async def Pull(self, request: kv_pb2.PullKvRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[kv_pb2.KvChunk]:
        yield kv_pb2.KvChunk(offset=0, data=b"x", total_bytes=2)
        if request.request_id == "full":
            raise ResourceExhausted("KV cache full")
        raise ZeroDivisionError("secret detail")

    async def Release(self, request: kv_pb2.ReleaseKvRequest, context: grpc.aio.ServicerContext) -> kv_pb2.ReleaseKvResponse:
        if request.request_id == "bad":
            raise InvalidRequest("request_id", "must not be 'bad'")
        if request.request_id == "gone":
            raise NotFound("no lease gone")
        if request.request_id == "abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        return kv_pb2.ReleaseKvResponse(released=True)


def test_health_reflection_and_error_boundary() -> None:
    async def main() -> None:
        built = await build_server([KV_SERVICE])
        assert built.port > 0 and built.address == f"127.0.0.1:{built.port}"
        kv_pb2_grpc.add_KvTransferServicer_to_server(Failing(), built.server)
        await built.server.start()
        pool = ChannelPool()
        try:
            channel = pool.get(built.address)
            assert pool.get(built.address) is channel and len(pool) == 1
            health = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                return reply.status

            assert [await status(s) for s in ("", KV_SERVICE)] == [NOT_SERVING, NOT_SERVING]
            await built.health.set_serving()
            assert [await status(s) for s in ("", KV_SERVICE)] == [SERVING, SERVING]
            await built.health.set_not_serving()
            assert await status("") == NOT_SERVING

            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            async for reply in reflect.ServerReflectionInfo(requests, timeout=5):
                names = {s.name for s in reply.list_services_response.service}
                assert {KV_SERVICE, "grpc.health.v1.Health"} <= names
                break

            stub = kv_pb2_grpc.KvTransferStub(channel)
            for rid, code, cls in [("bad", grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest),
                                   ("gone", grpc.StatusCode.NOT_FOUND, NotFound)]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Release(kv_pb2.ReleaseKvRequest(request_id=rid), timeout=5)
                assert info.value.code() == code
                err = error_from_rpc(info.value)
                assert type(err) is cls
            assert err.args == ("no lease gone",)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Release(kv_pb2.ReleaseKvRequest(request_id="abort"), timeout=5)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # the method's own abort passes

            got = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for chunk in stub.Pull(kv_pb2.PullKvRequest(request_id="full"), timeout=5):
                    got.append(chunk)
            assert len(got) == 1 and info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for chunk in stub.Pull(kv_pb2.PullKvRequest(request_id="boom"), timeout=5):
                    pass
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "secret" not in info.value.details() and "ref" in info.value.details()

            await built.health.enter_graceful_shutdown()
            await built.health.set_serving()  # ignored from now on
            assert await status(KV_SERVICE) == NOT_SERVING
        finally:
            await pool.close_all()
            assert len(pool) == 0
            await built.server.stop(None)

    asyncio.run(main())


def test_trailing_metadata_set_before_an_error_reaches_the_caller() -> None:
    """The decode servicer marks a failed KV pull this way; the router tells it from a decode failure."""
    from distserve.errors import Unavailable
    from distserve.rpc.errors import KV_FAULT
    from services.router.run import kv_fault

    class Marking(kv_pb2_grpc.KvTransferServicer):
        async def Pull(self, request, context):
            yield kv_pb2.KvChunk(offset=0, data=b"", total_bytes=0)  # a stream already under way
            if request.request_id == "mark":
                context.set_trailing_metadata((KV_FAULT,))
            raise Unavailable("holder gone")

    async def main() -> None:
        built = await build_server([KV_SERVICE])
        kv_pb2_grpc.add_KvTransferServicer_to_server(Marking(), built.server)
        await built.server.start()
        pool = ChannelPool()
        try:
            stub = kv_pb2_grpc.KvTransferStub(pool.get(built.address))
            for rid, marked in (("mark", True), ("plain", False)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in stub.Pull(kv_pb2.PullKvRequest(request_id=rid), timeout=10):
                        pass
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert kv_fault(info.value) is marked
        finally:
            await pool.close_all()
            await built.server.stop(None)

    asyncio.run(main())


def test_every_method_of_every_servicer_gets_the_error_table() -> None:
    """No method can miss the table (ListModels once did): a plain servicer method that raises gets
    the table's status from build_server's interceptor; on a bare grpc.aio server it is UNKNOWN."""
    from distserve.errors import Unavailable
    from distserve.v1 import generation_pb2, generation_pb2_grpc

    class Plain(generation_pb2_grpc.GenerationServicer):
        async def ListModels(self, request, context):
            if context.invocation_metadata() and dict(context.invocation_metadata()).get("fail") == "internal":
                raise ZeroDivisionError("secret detail")
            raise Unavailable("no worker serves it yet")

    async def main() -> None:
        built = await build_server(["distserve.v1.Generation"])
        generation_pb2_grpc.add_GenerationServicer_to_server(Plain(), built.server)
        await built.server.start()
        bare = grpc.aio.server()
        generation_pb2_grpc.add_GenerationServicer_to_server(Plain(), bare)
        bare_port = bare.add_insecure_port("127.0.0.1:0")
        await bare.start()
        pool = ChannelPool()
        try:
            stub = generation_pb2_grpc.GenerationStub(pool.get(built.address))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ListModels(generation_pb2.ListModelsRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and info.value.details() == "no worker serves it yet"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ListModels(generation_pb2.ListModelsRequest(), metadata=(("fail", "internal"),), timeout=5)
            assert info.value.code() == grpc.StatusCode.INTERNAL and "secret" not in info.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await generation_pb2_grpc.GenerationStub(pool.get(f"127.0.0.1:{bare_port}")).ListModels(
                    generation_pb2.ListModelsRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNKNOWN  # what the interceptor saves callers from
        finally:
            await pool.close_all()
            await built.server.stop(None)
            await bare.stop(None)

    asyncio.run(main())
