"""Overload and bad input on real servers: a router (and a second one with max_inflight 1), one prefill
and one decode worker (tiny-llama, as processes) and a real redis-server.

- regressions: garbage protobuf bytes and invalid UTF-8 get INVALID_ARGUMENT on every service,
  non-finite floats, bad request ids and oversized prompts get INVALID_ARGUMENT naming the field,
  a router at max_inflight refuses with RESOURCE_EXHAUSTED, a retry-after-ms hint and the shed count;
- fuzzing (hypothesis) over every field of Generation.Generate, Prefill.Prefill, Decode.Decode,
  KvTransfer.Pull and KvTransfer.Release, and over raw bytes: every call ends with a typed status
  (never UNKNOWN or INTERNAL), no process dies, every KV block and lease is given back, and a greedy
  request running meanwhile on the router keeps giving the same tokens.

`DISTSERVE_FUZZ_EXAMPLES` sets the examples per RPC (default 40, the short profile of the default
run; the long profile is `DISTSERVE_FUZZ_EXAMPLES=10000 pytest tests/integration/test_fuzz.py`).
"""

from __future__ import annotations

import math
import os
from collections import Counter
import threading
import time
import uuid

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distserve.state.redis_server import RedisServer
from distserve.v1 import common_pb2, decode_pb2, generation_pb2, kv_pb2, prefill_pb2
from tests.integration.service_procs import Cluster, scrape, total

pytestmark = pytest.mark.timeout(int(os.environ.get("DISTSERVE_FUZZ_TIMEOUT_S", "1800")))

EXAMPLES = int(os.environ.get("DISTSERVE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100, database=None,
                suppress_health_check=list(HealthCheck))
BLOCKS = 128
WORKER = ["--model", "tiny-llama", "--num-blocks", str(BLOCKS), "--threads", "1", "--heartbeat-s", "0.2", "--ttl-s", "2",
          "--metrics-port", "0", "--lease-s", "5"]
TYPED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
         grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.PERMISSION_DENIED,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE}
CALL_TIMEOUT_S = 10.0

GENERATE = "/distserve.v1.Generation/Generate"
PREFILL = "/distserve.v1.Prefill/Prefill"
DECODE = "/distserve.v1.Decode/Decode"
PULL = "/distserve.v1.KvTransfer/Pull"
RELEASE = "/distserve.v1.KvTransfer/Release"
WATCH = "/grpc.health.v1.Health/Watch"  # a stock handler that writes with context.write
STREAMING = {GENERATE, DECODE, PULL, WATCH}


class Suite:
    def __init__(self, c: Cluster, redis_url: str):
        common = ["--redis-url", redis_url]
        self.prefill = c.start("prefill", "prefill", [*common, *WORKER, "--worker-id", "prefill-f"])
        self.decode = c.start("decode", "decode", [*common, *WORKER, "--worker-id", "decode-f"])
        rargs = [*common, "--model", "tiny-llama", "--port", "0", "--metrics-port", "0", "--max-prompt-bytes", "65536"]
        self.router = c.start("router", "router", rargs)
        self.narrow = c.start("narrow", "router", [*rargs, "--max-inflight", "1", "--retry-after-ms", "321"])
        self.procs = (self.prefill, self.decode, self.router, self.narrow)
        for s in self.procs:
            s.wait_ready()
        self.channels = {s.name: grpc.insecure_channel(s.address) for s in self.procs}
        self.codes: Counter = Counter()  # (method, status name) of every fuzzed call
        self.slow: list = []  # calls that ran past CALL_TIMEOUT_S (typed, but worth a look)

    def raw(self, service: str, method: str, data: bytes, timeout: float = CALL_TIMEOUT_S):
        """(code, details, trailing metadata, response bytes) of one call with raw request bytes."""
        ch = self.channels[service]
        if method in STREAMING:
            call = ch.unary_stream(method)(data, timeout=timeout)
            try:
                out = list(call)
            except grpc.RpcError as exc:
                return exc.code(), exc.details(), dict(exc.trailing_metadata() or ()), None
            return call.code(), call.details(), dict(call.trailing_metadata() or ()), out
        try:
            out, call = ch.unary_unary(method).with_call(data, timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code(), exc.details(), dict(exc.trailing_metadata() or ()), None
        return call.code(), call.details(), dict(call.trailing_metadata() or ()), out

    def call(self, service: str, method: str, msg, timeout: float = CALL_TIMEOUT_S):
        code, details, meta, out = self.raw(service, method, msg.SerializeToString(), timeout)
        self.codes[method, code.name] += 1
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.slow.append((method, msg))
        assert code in TYPED, f"{method} answered {code} ({details}) to {msg!r}"
        assert self.alive(), "a process died"
        return code, details, meta, out

    def alive(self) -> bool:
        return all(s.popen.poll() is None for s in self.procs)

    def idle(self, timeout_s: float = 30.0) -> dict:
        """Waits until every KV block and lease is back; returns the last readings."""
        deadline = time.monotonic() + timeout_s
        while True:
            p = scrape("127.0.0.1", self.prefill.metrics_port)
            d = scrape("127.0.0.1", self.decode.metrics_port)
            got = {"prefill_used": total(p, "distserve_kv_blocks_used"), "leases": total(p, "distserve_kv_leases_held"),
                   "decode_used": total(d, "distserve_kv_blocks_used")}
            if not any(got.values()) or time.monotonic() > deadline:
                return got
            time.sleep(0.2)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    with RedisServer() as redis, Cluster(tmp_path_factory.mktemp("fuzz")) as c:
        s = Suite(c, redis.url)
        yield s
        for ch in s.channels.values():
            ch.close()


def gen_request(**kw) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(**kw)


def greedy(n: int = 24) -> generation_pb2.GenerateRequest:
    return gen_request(token_ids=generation_pb2.TokenIds(ids=[5, 9, 17, 33, 65]),
                       params=common_pb2.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))


def tokens_of(out) -> list[int]:
    return [t for m in out for t in generation_pb2.GenerateResponse.FromString(m).token_ids]


# -- regressions -----------------------------------------------------------------------------------
def test_garbage_bytes_and_invalid_utf8_get_invalid_argument_on_every_service(suite):
    garbage = b"\xff\xff\xff\xff\x0f"  # a field header with a truncated varint
    bad_utf8 = b"\x12\x02\xc3\x28"  # GenerateRequest.text = invalid UTF-8
    for service, method in (("router", GENERATE), ("prefill", PREFILL), ("decode", DECODE), ("prefill", PULL), ("prefill", RELEASE),
                            ("router", "/grpc.health.v1.Health/Check"), ("decode", WATCH)):
        code, details, _, _ = suite.raw(service, method, garbage)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request: "), (method, code, details)
    code, details, _, _ = suite.raw("router", GENERATE, bad_utf8)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    code, _, _, out = suite.raw("router", GENERATE, greedy(4).SerializeToString())
    assert code == grpc.StatusCode.OK and len(tokens_of(out)) == 4  # well-formed bytes still work


@pytest.mark.parametrize("field,req", [
    ("temperature", gen_request(text="hi", params=common_pb2.SamplingParams(temperature=math.inf))),
    ("temperature", gen_request(text="hi", params=common_pb2.SamplingParams(temperature=math.nan))),
    ("top_p", gen_request(text="hi", params=common_pb2.SamplingParams(top_p=math.inf))),
    ("request_id", gen_request(text="hi", request_id="x" * 129)),
    ("request_id", gen_request(text="hi", request_id="a\nINFO forged log line")),
    ("text", gen_request(text="x" * 65537)),
    ("max_tokens", gen_request(text="y" * 20000)),  # tokenized on a thread (> 16 KiB), then too long for the context
    ("prompt", gen_request(text="")),
])
def test_malformed_fields_get_invalid_argument_naming_the_field(suite, field, req):
    code, details, _, _ = suite.call("router", GENERATE, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}: "), (code, details)


def test_a_request_id_with_a_newline_forges_no_worker_log_line(suite):
    rid = "evil\nERROR forged-line"
    req = prefill_pb2.PrefillRequest(request_id=rid, token_ids=[5, 6, 7], params=common_pb2.SamplingParams(max_tokens=4))
    code, details, _, out = suite.call("prefill", PREFILL, req)
    assert code == grpc.StatusCode.OK, details
    h = prefill_pb2.PrefillResponse.FromString(out).kv_handle
    suite.call("prefill", RELEASE, kv_pb2.ReleaseKvRequest(request_id=h.request_id, transfer_token=h.transfer_token))
    deadline = time.monotonic() + 5
    while "prefilled 'evil" not in suite.prefill.text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = suite.prefill.text()
    assert "prefilled 'evil\\nERROR forged-line'" in text
    assert "\nERROR forged-line" not in text


def test_two_clients_sending_the_same_request_id_never_interfere(suite):
    """A client id is only a label: the workers key each call by a router-made id (the issue saw the
    second request hang or truncate the first)."""
    first = gen_request(request_id="same-label", token_ids=generation_pb2.TokenIds(ids=[5, 9, 17, 33, 65]),
                        params=common_pb2.SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    second = gen_request(request_id="same-label", token_ids=generation_pb2.TokenIds(ids=[7, 8, 9]),
                         params=common_pb2.SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    alone = [tokens_of(suite.raw("router", GENERATE, r.SerializeToString(), 60)[3]) for r in (first, second)]
    results: dict = {}
    threads = [threading.Thread(target=lambda k=k, r=r: results.update({k: suite.raw("router", GENERATE, r.SerializeToString(), 60)}))
               for k, r in (("first", first), ("second", second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for (k, r), want in zip((("first", first), ("second", second)), alone):
        code, details, _, out = results[k]
        last = generation_pb2.GenerateResponse.FromString(out[-1])
        assert code == grpc.StatusCode.OK and tokens_of(out) == want and last.finish_reason, (k, code, details)
        assert len(want) == r.params.max_tokens


def test_a_valid_request_id_of_128_characters_is_served(suite):
    rid = "Ab0._:-" * 18 + "xy"
    code, _, _, out = suite.call("router", GENERATE, gen_request(request_id=rid, text="hello", params=common_pb2.SamplingParams(max_tokens=3)))
    assert code == grpc.StatusCode.OK and generation_pb2.GenerateResponse.FromString(out[-1]).request_id == rid


def test_a_router_at_max_inflight_refuses_at_once_with_a_retry_hint_and_counts_it_shed(suite):
    long = greedy(900)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=suite.raw("narrow", GENERATE, long.SerializeToString(), 60)))
    t.start()
    deadline = time.monotonic() + 20
    while True:  # until the long request holds the one slot
        time.sleep(0.05)
        m = scrape("127.0.0.1", suite.narrow.metrics_port)
        if total(m, "distserve_inflight_requests") >= 1 or time.monotonic() > deadline:
            break
    t0 = time.monotonic()
    code, details, meta, _ = suite.call("narrow", GENERATE, greedy(4))
    refused_in = time.monotonic() - t0
    from distserve.client import Client
    from distserve.errors import ResourceExhausted

    with Client(suite.narrow.address, timeout_s=10) as c, pytest.raises(ResourceExhausted) as refused:
        c.generate([5, 6], max_tokens=2)  # the SDK hands the hint on
    t.join()
    assert refused.value.retry_after_s == pytest.approx(0.321)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert meta.get("retry-after-ms") == "321" and "max_inflight 1" in details
    assert refused_in < 1.0
    assert result["r"][0] == grpc.StatusCode.OK and len(tokens_of(result["r"][3])) == 900
    m = scrape("127.0.0.1", suite.narrow.metrics_port)
    assert total(m, "distserve_requests_total", role="router", outcome="shed") == 2
    assert total(m, "distserve_requests_total", role="router", outcome="finished") == 1
    code, _, _, out = suite.call("narrow", GENERATE, greedy(4))  # the slot is free again
    assert code == grpc.StatusCode.OK and len(tokens_of(out)) == 4


# -- fuzzing -------------------------------------------------------------------------------------
u32 = st.integers(0, 2**32 - 1)
small = st.integers(0, 600)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
vocab = st.integers(0, 258)  # tiny-llama's token ids
ids = st.one_of(st.lists(vocab, min_size=1, max_size=40), st.lists(st.one_of(vocab, u32), max_size=40))
label = st.one_of(st.text(max_size=40), st.from_regex(r"[A-Za-z0-9._:-]{1,20}", fullmatch=True), st.text(min_size=120, max_size=200))
valid_id = st.from_regex(r"[A-Za-z0-9]{8,16}", fullmatch=True)


def either(draw, wild: bool, tame, anything):
    """A value from `tame` (one a server accepts), or in a wild draw half the time from `anything`."""
    return draw(anything) if wild and draw(st.booleans()) else draw(tame)


@st.composite
def sampling(draw):
    """Sampling params: all fields valid in a tame draw (so calls get past validation), any in a wild one."""
    wild = draw(st.booleans())
    p = common_pb2.SamplingParams()
    if draw(st.booleans()):
        p.max_tokens = either(draw, wild, st.integers(1, 12), u32)
    if draw(st.booleans()):
        p.temperature = either(draw, wild, st.sampled_from([0.0, 0.7, 1.0]), floats)
    if draw(st.booleans()):
        p.top_p = either(draw, wild, st.sampled_from([1.0, 0.9, 0.5]), floats)
    if draw(st.booleans()):
        p.top_k = either(draw, wild, st.integers(0, 50), st.integers(-(2**31), 2**31 - 1))
    if draw(st.booleans()):
        p.seed = either(draw, wild, st.integers(0, 2**63 - 1), st.integers(0, 2**64 - 1))
    p.stop.extend(either(draw, wild, st.lists(st.text(min_size=1, max_size=8), max_size=3), st.lists(st.text(max_size=8), max_size=4)))
    p.stop_token_ids.extend(either(draw, wild, st.lists(vocab, max_size=3), st.lists(st.one_of(small, u32), max_size=4)))
    p.ignore_eos = draw(st.booleans())
    p.logprobs = draw(st.booleans())
    p.output_offset = either(draw, wild, st.integers(0, 4), u32)
    return p


@st.composite
def generate_requests(draw):
    wild = draw(st.booleans())
    r = generation_pb2.GenerateRequest(request_id=either(draw, wild, st.one_of(st.just(""), valid_id), label),
                                       params=draw(sampling()), apply_chat_template=draw(st.booleans()))
    kind = either(draw, wild, st.sampled_from(["text", "ids"]), st.just("none"))
    if kind == "text":
        r.text = either(draw, wild, st.text(min_size=1, max_size=60), st.text(max_size=600))
    elif kind == "ids":
        r.token_ids.ids.extend(draw(ids))
    if r.request_id:
        r.resume_token_ids.extend(either(draw, wild, st.lists(vocab, max_size=3), st.lists(st.one_of(small, u32), max_size=6)))
    return r


@st.composite
def kv_handles(draw, suite):
    h = common_pb2.KvHandle(request_id=draw(label), worker_id=draw(st.text(max_size=12)),
                            kv_address=draw(st.sampled_from([suite.prefill.address, "", "127.0.0.1:1", "not an address"])),
                            transports=draw(st.lists(st.sampled_from(["grpc", "torch", "shm", "mooncake", "zz"]), max_size=3)),
                            layout=common_pb2.KvLayout(num_layers=draw(small), num_kv_heads=draw(small), head_dim=draw(small),
                                                       block_size=draw(small), dtype=draw(st.sampled_from(["float32", "int8", "", "x"]))),
                            num_tokens=draw(st.one_of(small, u32)), lease_expiry_unix=draw(st.floats(allow_nan=True)),
                            transfer_token=draw(st.binary(max_size=40)), host_id=draw(st.text(max_size=10)))
    h.transport_params.update(draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)))
    return h


class InFlight:
    """A greedy request sent again and again on the router while the fuzzer runs."""

    def __init__(self, suite: Suite, expected: list[int]):
        self.suite, self.expected = suite, expected
        self.results: list = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self.stop.is_set():
            code, details, _, out = self.suite.raw("router", GENERATE, greedy(48).SerializeToString(), 60)
            self.results.append((code, details, tokens_of(out) if out else None))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(90)
        bad = [r for r in self.results if r[0] != grpc.StatusCode.OK or r[2] != self.expected]
        assert self.results and not bad, bad[:3]


def fuzz_and_check(suite: Suite, run, reaches: tuple[str, ...] = ()) -> None:
    """Runs the fuzzer `run` with a request in flight, then checks nothing leaked; `reaches`: methods
    that must have answered OK at least once (the fuzzer got past validation, not only into it)."""
    code, _, _, out = suite.raw("router", GENERATE, greedy(48).SerializeToString(), 60)
    assert code == grpc.StatusCode.OK
    suite.codes.clear()
    with InFlight(suite, tokens_of(out)):
        run()
    print(sorted(suite.codes.items()))
    for method, msg in suite.slow[:5]:
        print("past the call timeout:", method, repr(msg)[:600])
    suite.slow.clear()
    for method in reaches:
        assert suite.codes[method, "OK"] > 0, f"no {method} call got past validation: {sorted(suite.codes.items())}"
    assert suite.alive()
    left = suite.idle()
    assert not any(left.values()), f"KV blocks or leases not given back: {left}"


def test_fuzz_generate(suite):
    @FUZZ
    @given(req=generate_requests())
    def one(req):
        suite.call("router", GENERATE, req)

    fuzz_and_check(suite, one, (GENERATE,))


def test_fuzz_prefill_then_release(suite):
    @FUZZ
    @given(req=st.builds(prefill_pb2.PrefillRequest, request_id=st.one_of(valid_id, label), token_ids=ids, params=sampling()),
           release_token=st.booleans())
    def one(req, release_token):
        code, _, _, out = suite.call("prefill", PREFILL, req)
        if code == grpc.StatusCode.OK:
            resp = prefill_pb2.PrefillResponse.FromString(out)
            if resp.HasField("kv_handle"):  # give the KV back; a wrong token first must not release it
                h = resp.kv_handle
                if release_token:
                    bad = kv_pb2.ReleaseKvRequest(request_id=h.request_id, transfer_token=h.transfer_token + b"x")
                    c, _, _, o = suite.call("prefill", RELEASE, bad)
                    assert c != grpc.StatusCode.OK or not kv_pb2.ReleaseKvResponse.FromString(o).released
                c, d, _, _ = suite.call("prefill", RELEASE, kv_pb2.ReleaseKvRequest(request_id=h.request_id, transfer_token=h.transfer_token))
                assert c == grpc.StatusCode.OK, d

    fuzz_and_check(suite, one, (PREFILL, RELEASE))


def test_fuzz_decode(suite):
    @FUZZ
    @given(data=st.data())
    def one(data):
        req = decode_pb2.DecodeRequest(request_id=data.draw(st.one_of(valid_id, label)), prompt_token_ids=data.draw(ids),
                                       first_token=data.draw(st.one_of(vocab, u32)), first_logprob=data.draw(floats),
                                       params=data.draw(sampling()))
        if data.draw(st.booleans()):
            req.kv_handle.CopyFrom(data.draw(kv_handles(suite)))
        suite.call("decode", DECODE, req)

    fuzz_and_check(suite, one, (DECODE,))


def test_fuzz_kv_pull_and_release(suite):
    @FUZZ
    @given(pull=st.builds(kv_pb2.PullKvRequest, request_id=label, transfer_token=st.binary(max_size=40),
                          chunk_bytes=st.one_of(small, u32), wire_dtype=st.one_of(st.sampled_from(["", "float16", "int8"]), st.text(max_size=8))),
           release=st.builds(kv_pb2.ReleaseKvRequest, request_id=label, transfer_token=st.binary(max_size=40)))
    def one(pull, release):
        suite.call("prefill", PULL, pull)
        suite.call("prefill", RELEASE, release)

    fuzz_and_check(suite, one)


def test_fuzz_raw_bytes(suite):
    targets = [("router", GENERATE), ("prefill", PREFILL), ("decode", DECODE), ("prefill", PULL), ("prefill", RELEASE)]

    @FUZZ
    @given(target=st.sampled_from(targets), data=st.binary(max_size=200))
    def one(target, data):
        code, details, _, _ = suite.raw(*target, data)
        assert code in TYPED, f"{target[1]} answered {code} ({details}) to {data!r}"

    fuzz_and_check(suite, one)


def test_fuzz_decode_with_a_real_kv_handle(suite):
    """Decode of KV a prefill worker really holds, with the handle, prompt and params bent: the pull
    either works or fails typed, and the KV is given back on both sides."""

    @FUZZ
    @given(data=st.data())
    def one(data):
        prompt = data.draw(st.lists(vocab, min_size=1, max_size=30))
        code, details, _, out = suite.call("prefill", PREFILL, prefill_pb2.PrefillRequest(
            # a fresh id each time: the engine forgets a released id only a moment after Release returns
            # (it frees on its own thread), and ids reused meanwhile are refused - left to server-made ids (issue 20)
            request_id=f"fz{uuid.uuid4().hex}", token_ids=prompt, params=common_pb2.SamplingParams(max_tokens=8, ignore_eos=True)))
        assert code == grpc.StatusCode.OK, details
        resp = prefill_pb2.PrefillResponse.FromString(out)
        h = common_pb2.KvHandle()
        h.CopyFrom(resp.kv_handle)
        bent = data.draw(st.sets(st.sampled_from(["token", "tokens", "layout", "prompt", "request_id", "transports", "address"])))
        if "token" in bent:
            h.transfer_token = data.draw(st.binary(max_size=40))
        if "tokens" in bent:
            h.num_tokens = data.draw(st.one_of(small, u32))
        if "layout" in bent:
            h.layout.num_layers, h.layout.num_kv_heads = data.draw(small), data.draw(small)
            h.layout.head_dim, h.layout.block_size = data.draw(small), data.draw(small)
            h.layout.dtype = data.draw(st.sampled_from(["float32", "float16", "int8", "", "x"]))
        if "request_id" in bent:
            h.request_id = data.draw(label)
        if "transports" in bent:
            h.ClearField("transports")
            h.transports.extend(data.draw(st.lists(st.sampled_from(["grpc", "torch", "shm", "mooncake", "zz"]), max_size=3)))
        if "address" in bent:
            h.kv_address = data.draw(st.sampled_from(["", "127.0.0.1:1", "not an address", suite.decode.address]))
        req = decode_pb2.DecodeRequest(request_id=data.draw(valid_id), first_token=resp.first_token, kv_handle=h,
                                       prompt_token_ids=data.draw(ids) if "prompt" in bent else prompt,
                                       params=data.draw(sampling()))
        suite.call("decode", DECODE, req)
        suite.call("prefill", RELEASE, kv_pb2.ReleaseKvRequest(request_id=resp.kv_handle.request_id,
                                                               transfer_token=resp.kv_handle.transfer_token))

    fuzz_and_check(suite, one, (DECODE,))


def test_a_kv_handle_claiming_more_tokens_than_held_gets_a_typed_error(suite):
    """Found by the fuzzer (10,000-example profile): a handle whose num_tokens was bent to 20971521
    made Decode answer INTERNAL."""
    code, details, _, out = suite.call("prefill", PREFILL, prefill_pb2.PrefillRequest(
        request_id=f"fz{uuid.uuid4().hex}", token_ids=list(range(3, 23)), params=common_pb2.SamplingParams(max_tokens=8)))
    assert code == grpc.StatusCode.OK, details
    resp = prefill_pb2.PrefillResponse.FromString(out)
    h = common_pb2.KvHandle()
    h.CopyFrom(resp.kv_handle)
    h.num_tokens = 20971521
    req = decode_pb2.DecodeRequest(request_id="00000000", prompt_token_ids=[0], first_token=resp.first_token, kv_handle=h)
    code, details, _, _ = suite.raw("decode", DECODE, req.SerializeToString())
    suite.call("prefill", RELEASE, kv_pb2.ReleaseKvRequest(request_id=h.request_id, transfer_token=h.transfer_token))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("kv_handle: num_tokens"), (code, details)
