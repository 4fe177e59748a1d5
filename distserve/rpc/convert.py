"""Protobuf <-> domain conversions shared by the router and the workers."""

from __future__ import annotations

from distserve.engine.sampling import SamplingParams
from distserve.engine.sequence import FinishReason
from distserve.v1 import common_pb2

_FINISH_TO_PB = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
}
FINISH_NAMES = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
    common_pb2.FINISH_REASON_ABORTED: "aborted",
}


def finish_to_pb(reason: FinishReason | None) -> int:
    return _FINISH_TO_PB.get(reason, common_pb2.FINISH_REASON_UNSPECIFIED)


_DEFAULT = SamplingParams()  # what a field the caller left unset means: SamplingParams' own defaults


def params_from_pb(p: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else _DEFAULT.max_tokens,
        temperature=p.temperature if p.HasField("temperature") else _DEFAULT.temperature,
        top_p=p.top_p if p.HasField("top_p") else _DEFAULT.top_p,
        top_k=p.top_k if p.HasField("top_k") else _DEFAULT.top_k,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
        output_offset=p.output_offset,
        min_tokens=p.min_tokens,
        top_logprobs=p.top_logprobs,
    )


def params_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
        output_offset=p.output_offset,
        min_tokens=p.min_tokens,
        top_logprobs=p.top_logprobs,
    )
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def top_logprobs_to_pb(top: list[tuple[int, float]]) -> common_pb2.TopLogprobs:
    """One position's (token id, log-prob) pairs, best first, as the wire message."""
    return common_pb2.TopLogprobs(token_ids=[t for t, _ in top], logprobs=[v for _, v in top])


def top_logprobs_from_pb(msg: common_pb2.TopLogprobs) -> list[tuple[int, float]]:
    return list(zip(msg.token_ids, msg.logprobs))
