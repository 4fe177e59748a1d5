"""The gRPC face of the router: `distserve.v1.Generation` over the shared request path.

Thin by design: protobuf in, `Generation.generate` (services/router/generation.py), protobuf out.
Domain errors become statuses through the server's `ErrorTable` interceptor (distserve/rpc/server.py,
the table in distserve/rpc/errors.py), for ListModels as for Generate; an admission refusal is
RESOURCE_EXHAUSTED with its `retry-after-ms` in the trailing metadata.
"""

from __future__ import annotations

import grpc

from distserve.v1 import generation_pb2, generation_pb2_grpc
from services.router.admission import RETRY_AFTER_KEY, Shed
from services.router.generation import Generation


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, generation: Generation):
        self.generation = generation

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            async for msg in self.generation.generate(request, context.time_remaining()):
                yield msg
        except Shed as exc:
            context.set_trailing_metadata(((RETRY_AFTER_KEY, str(exc.retry_after_ms)),))
            raise

    async def ListModels(self, request: generation_pb2.ListModelsRequest, context) -> generation_pb2.ListModelsResponse:
        return await self.generation.list_models()
