"""`distserve up --elastic` under its defaults (TLS between every process, a Redis user per role):
the worker started as prefill holds what both roles need, so when asked it leaves prefill for decode,
and with a conditional router the two decode workers then serve every prompt themselves; no request
is lost or altered on the way."""

from __future__ import annotations

import asyncio
import random

import pytest

from distserve.client import AsyncClient
from distserve.state.connect import connect
from distserve.state.registry import Registry
from distserve.up import UpProcess
from tests.integration.test_elastic_roles import reference, roles, wait_role

pytestmark = pytest.mark.timeout(600)


def test_up_elastic_moves_its_prefill_worker_to_decode_under_tls_and_acls(tmp_path, tiny, dump_on_failure):
    up = UpProcess(tmp_path, "--model", "tiny-llama", "--prefill", "1", "--decode", "1", "--elastic", "--http-port", "-1",
                   "--router-arg=--disagg-mode=conditional", "--worker-arg=--num-blocks=256", "--worker-arg=--heartbeat-s=0.2",
                   "--worker-arg=--drain-s=20")
    dump_on_failure(up)
    rng = random.Random(3)
    reqs = [([rng.randrange(3, 259) for _ in range(rng.randrange(8, 120))], rng.randrange(4, 40)) for _ in range(48)]
    try:
        assert up.tls_dir is not None  # the default: mutual TLS

        async def ask(worker: str, role: str) -> bool:
            r = connect(up.redis_url, role="router")  # what `distserve plan --watch --apply` does
            try:
                return await Registry(r).request_role(worker, role)
            finally:
                await r.aclose()

        async def go():
            async with AsyncClient(up.target, **up.client_tls) as c:
                load = lambda batch: asyncio.gather(*(c.generate(p, max_tokens=n, temperature=0.0) for p, n in batch))  # noqa: E731
                before = await load(reqs[:16])
                during = asyncio.ensure_future(load(reqs[16:32]))
                assert await ask("prefill-1", "decode")
                await wait_role(up.redis_url, "prefill-1", "decode")
                during = await during
                await asyncio.sleep(0.5)  # the router's registry view has it too
                after = await load(reqs[32:])
            return before, during, after

        before, during, after = asyncio.run(go())
        for (p, n), o in zip(reqs, before + during + after):
            assert o.token_ids == reference(tiny, p, n)
        assert any(o.metrics.prefill_worker == "prefill-1" for o in before)
        assert all(o.metrics.disagg_decision == "local" for o in after)
        assert {o.metrics.decode_worker for o in after} == {"prefill-1", "decode-1"}
        assert asyncio.run(roles(up.redis_url)) == {"prefill-1": "decode", "decode-1": "decode"}
    finally:
        assert up.stop() == 0
