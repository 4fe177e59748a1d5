import pytest

from distserve.errors import InvalidRequest
from distserve.engine.sampling import SamplingParams, find_stop, validate_request


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ([], SamplingParams(), "prompt"),
        ([1] * 10, SamplingParams(max_tokens=0), "max_tokens"),
        ([1] * 100, SamplingParams(max_tokens=30), "max_tokens"),  # 100 + 30 > 128
        ([1], SamplingParams(temperature=-0.5), "temperature"),
        ([1], SamplingParams(top_p=0.0), "top_p"),
        ([1], SamplingParams(top_p=2.0), "top_p"),
        ([1], SamplingParams(top_k=-1), "top_k"),
        ([1, 500], SamplingParams(), "prompt"),
        ([1], SamplingParams(stop_token_ids=(999,)), "stop_token_ids"),
        ([1], SamplingParams(stop=("",)), "stop"),
    ],
)
def test_validation_names_the_field(prompt, params, field):
    with pytest.raises(InvalidRequest) as e:
        validate_request(prompt, params, vocab_size=300, max_model_len=128)
    assert e.value.field == field
    assert field in str(e.value)


def test_valid_request_passes():
    validate_request([1, 2, 3], SamplingParams(max_tokens=10, temperature=0.7, top_p=0.9, top_k=5), 300, 128)


def test_find_stop_only_looks_at_new_text():
    assert find_stop("hello world", ("wor",), 0) == 6
    assert find_stop("hello world", ("hel",), 6) is None  # ended before the new text
    assert find_stop("hello world", ("lo w",), 5) == 3  # straddles old and new text
    assert find_stop("abcabc", ("c", "b"), 0) == 1  # earliest match wins


def test_sampling_defaults_have_one_owner_the_client_leaves_unset_fields_to_the_server():
    from distserve.client import build_request
    from distserve.rpc.convert import params_from_pb

    req = build_request("hello")
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        assert not req.params.HasField(name), name
    assert params_from_pb(req.params) == SamplingParams()
    chosen = params_from_pb(build_request("hello", max_tokens=3, temperature=0.0, top_p=0.5, top_k=7, seed=1).params)
    assert (chosen.max_tokens, chosen.temperature, chosen.top_p, chosen.top_k, chosen.seed) == (3, 0.0, 0.5, 7, 1)
