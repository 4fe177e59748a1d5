"""The scheduler on synthetic sequences: no model involved."""

from distserve.engine.block_manager import BlockManager
from distserve.engine.sampling import SamplingParams
from distserve.engine.scheduler import Scheduler
from distserve.engine.sequence import Sequence, SequenceStatus


def seq(i, n, max_tokens=8):
    return Sequence(str(i), list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), 0.0)


def test_prefill_batches_up_to_token_budget():
    s = Scheduler(BlockManager(100, 16), max_num_batched_tokens=100, max_num_seqs=8, chunked_prefill=False, hold_after_prefill=True)
    for i, n in enumerate([40, 40, 40]):
        s.waiting.append(seq(i, n))
    out = s.schedule()
    assert [c.seq.request_id for c in out.chunks] == ["0", "1"]  # the third would pass the budget
    assert sum(c.end - c.start for c in out.chunks) <= 100
    assert [c.seq.request_id for c in s.schedule().chunks] == ["2"]


def test_oversized_prompt_runs_alone():
    s = Scheduler(BlockManager(100, 16), 32, 8, False, True)
    s.waiting.extend([seq(0, 100), seq(1, 4)])
    out = s.schedule()
    assert [c.seq.request_id for c in out.chunks] == ["0"]


def test_admission_never_overcommits_and_queues():
    bm = BlockManager(10, 16)
    s = Scheduler(bm, 10_000, 64, False, False)
    # each needs ceil((64 + 8 - 1) / 16) = 5 blocks: two fit, the third waits
    s.waiting.extend([seq(0, 64), seq(1, 64), seq(2, 64)])
    out = s.schedule()
    assert len(out.chunks) == 2 and bm.num_free == 0
    assert len(s.waiting) == 1 and s.waiting[0].status is SequenceStatus.WAITING


def test_prefill_priority_then_decode():
    s = Scheduler(BlockManager(100, 16), 1000, 64, False, False)
    a = seq(0, 10)
    s.waiting.append(a)
    out = s.schedule()
    assert out.chunks and not out.decode
    s.running.append(a)
    out = s.schedule()
    assert out.decode == [a] and not out.chunks


def test_chunked_prefill_mixes_decodes_and_chunks():
    s = Scheduler(BlockManager(100, 16), max_num_batched_tokens=20, max_num_seqs=64, chunked_prefill=True, hold_after_prefill=False)
    running = [seq(i, 5) for i in range(4)]
    s.running.extend(running)
    long = seq(9, 50)
    s.waiting.append(long)
    out = s.schedule()
    assert out.decode == running
    assert [(c.start, c.end) for c in out.chunks] == [(0, 16)]  # 20 - 4 decode tokens
    long.num_computed_tokens = 16
    out = s.schedule()
    assert [(c.start, c.end) for c in out.chunks] == [(16, 32)]


def test_max_num_seqs_caps_a_step():
    s = Scheduler(BlockManager(1000, 16), 10_000, 3, False, False)
    s.waiting.extend(seq(i, 4) for i in range(5))
    assert len(s.schedule().chunks) == 3
