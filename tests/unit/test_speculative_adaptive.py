"""Speculative decoding's adaptive choice of k (distserve.engine.speculative.Speculator.propose):
how many drafts each request gets from its acceptance per match length, the engine's estimate a new
request starts from, the step-time fit's price of a row, the step's room and max_tokens."""

from distserve.engine.sampling import SamplingParams
from distserve.engine.sequence import Sequence
from distserve.engine.speculative import SpecConfig, SpecState, Speculator

def _seq(prompt, out=()):
    s = Sequence("r", list(prompt), SamplingParams(max_tokens=100, temperature=0.0), 0.0)
    s.output_token_ids = list(out)
    return s


def test_k_follows_acceptance_and_speculation_stops_when_drafts_fail():
    spec = Speculator(SpecConfig("ngram", max_k=5))
    seq = _seq([7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    first = spec.propose([seq], room=100, fixed_s=0.02, row_s=0.0005)
    assert first is not None and 1 <= len(first[0]) < 5  # the prior (1/2) allows a few
    for _ in range(6):
        spec.record(seq, 5, 5)
    assert len(spec.propose([seq], room=100, fixed_s=0.02, row_s=0.0005)[0]) == 5  # accepted: k grows to max
    assert spec.propose([seq], room=2, fixed_s=0.02, row_s=0.0005)[0] == [1, 2]  # within the step's room
    for _ in range(20):
        spec.record(seq, 3, 0)
    assert spec.propose([seq], room=100, fixed_s=0.02, row_s=0.0005) is None  # rejected: speculation off
    probes = 0
    for _ in range(200):  # ... and tried again now and then
        probes += spec.propose([seq], room=100, fixed_s=0.02, row_s=0.0005) is not None
    assert probes >= 1


class FixedIndex:
    """A drafter that always offers the same draft, as if it matched an n-gram of length last_n."""

    def __init__(self, draft, last_n):
        self.d, self.last_n = draft, last_n

    def sync(self, prompt_len, output):
        pass

    def draft(self, k):
        return self.d[:k]


def test_acceptance_is_learned_per_match_length_and_new_requests_start_from_the_engines():
    spec = Speculator(SpecConfig("ngram", max_k=5))
    seq = _seq([1, 2, 3])
    seq.spec = SpecState(FixedIndex([4, 5, 6, 7, 8], last_n=4))
    long = lambda s: len((spec.propose([s], room=100, fixed_s=0.02, row_s=0.002) or [[]])[0])  # noqa: E731
    for _ in range(8):  # 4-gram matches: every draft accepted
        long(seq)
        spec.record(seq, 5, 5)
    assert long(seq) == 5
    seq.spec.index = FixedIndex([4, 5, 6, 7, 8], last_n=2)
    for _ in range(8):  # 2-gram matches of the same request: the first draft rejected
        if long(seq):
            spec.record(seq, 1, 0)
    assert long(seq) == 0  # this request's 2-gram drafts stop ...
    seq.spec.index = FixedIndex([4, 5, 6, 7, 8], last_n=4)
    assert long(seq) == 5  # ... its 4-gram drafts go on
    fresh = _seq([1, 2, 3])
    fresh.spec = SpecState(FixedIndex([4, 5, 6, 7, 8], last_n=4))
    assert long(fresh) == 5  # a new request starts from what the engine saw of 4-gram drafts ...
    fresh.spec.index = FixedIndex([4, 5, 6, 7, 8], last_n=2)
    assert long(fresh) < 2  # ... and of 2-gram ones
    untaught = Speculator(SpecConfig("ngram", max_k=5))
    other = _seq([1, 2, 3])
    other.spec = SpecState(FixedIndex([4, 5, 6, 7, 8], last_n=4))
    assert 1 <= len(untaught.propose([other], room=100, fixed_s=0.02, row_s=0.002)[0]) < 5  # an engine that saw nothing: the prior (1/2)


def test_drafts_cost_more_than_they_bring_on_a_slow_row():
    spec = Speculator(SpecConfig("ngram", max_k=5))
    seq = _seq([7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    spec.propose([seq], room=100, fixed_s=0.02, row_s=0.0005)
    for _ in range(4):
        spec.record(seq, 4, 2)  # about 3 in 4 accepted
    assert spec.propose([seq], room=100, fixed_s=0.02, row_s=0.0005) is not None
    assert spec.propose([seq], room=100, fixed_s=0.001, row_s=0.01) is None  # a row costs 10x a step


def test_no_draft_past_max_tokens():
    spec = Speculator(SpecConfig("ngram", max_k=5, adaptive=False))
    seq = _seq([1, 2, 3, 4, 5, 6, 1, 2], [])
    seq.params = SamplingParams(max_tokens=3, temperature=0.0)
    assert spec.propose([seq], room=100, fixed_s=0.02, row_s=0.0005) == [[3, 4]]  # 2 drafts + 1 token = 3
