"""Helpers the engine-level tests share: seeded random prompts and running an engine to the end."""

import random


def prompts(n, seed=0, lo=3, hi=120):
    """n prompts of token ids in [3, 259) (tiny-llama's byte range), lengths in [lo, hi)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 259) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def run_to_end(engine, outputs=None):
    """Step until the engine is idle; request id -> every token it emitted."""
    outputs = {} if outputs is None else outputs
    while engine.has_work():
        for o in engine.step():
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
    return outputs


def run_prompts(engine, prompts, params):
    """Add prompt i as request "i", step until idle; request id -> its tokens."""
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    return run_to_end(engine)
