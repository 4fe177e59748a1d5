import pytest

from distserve.engine.block_manager import BlockManager


def test_allocate_all_or_nothing_and_free():
    bm = BlockManager(8, 16)
    a = bm.allocate(5)
    assert len(set(a)) == 5 and bm.num_free == 3
    assert not bm.can_allocate(4)
    with pytest.raises(MemoryError):
        bm.allocate(4)
    assert bm.num_free == 3  # a failed allocation takes nothing
    bm.free(a)
    assert bm.num_free == 8


def test_double_free_is_caught():
    bm = BlockManager(4, 16)
    a = bm.allocate(2)
    bm.free(a)
    with pytest.raises(RuntimeError):
        bm.free(a[:1])


def test_blocks_for_rounds_up():
    bm = BlockManager(4, 16)
    assert [bm.blocks_for(n) for n in (1, 16, 17, 32, 33)] == [1, 1, 2, 2, 3]


def test_blocks_needed_counts_the_prompt_and_every_token_whose_kv_is_written():
    from distserve.engine.block_manager import blocks_needed

    # the last sampled token's KV is never written: 16 prompt tokens + 1 output fit one block of 16
    assert [blocks_needed(16, m, 16) for m in (1, 2, 17, 18)] == [1, 2, 2, 3]
    assert blocks_needed(1, 1, 16) == 1 and blocks_needed(33, 1, 16) == 3
