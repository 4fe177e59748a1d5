"""Choosing the next token of each sequence from its logits.

Greedy rows take the argmax in one batched call. Sampled rows apply temperature, top-k and top-p,
then draw. A seeded request draws the token at output position i from a generator seeded with
(seed, i) alone: the draw depends only on its seed, its position and its own logits, not on what
else is batched nor on which worker made the earlier tokens, so a request replayed on another worker
after a failure (`SamplingParams.output_offset` = tokens already produced) continues the same
stream. Unseeded rows draw from the engine's generator.
The reported log-probability is the token's under the model's raw distribution, and so are the top
log-probabilities (`top_logprobs`: the k most likely tokens at that position, best first), from one
log_softmax + topk over the rows that ask (vLLM's default "raw_logprobs" mode).
Before a request has `min_tokens` output tokens its end-of-sequence tokens (unless `ignore_eos`) and
its `stop_token_ids` are masked to -inf before choosing, as vLLM's min-tokens logits processor does,
so the model picks another token instead of ending early; the reported log-probs stay the raw ones.
"""

from __future__ import annotations

import torch

from distserve.engine.sequence import Sequence


TopLogprobs = list[tuple[int, float]]  # (token id, log-prob), most likely first


class Sampler:
    def __init__(self, seed: int | None = None, eos_token_ids: tuple[int, ...] | frozenset[int] = ()):
        self.eos = tuple(eos_token_ids)
        self._gen = torch.Generator()
        if seed is not None:
            self._gen.manual_seed(seed)
        else:
            self._gen.seed()

    def generator_for(self, seq: Sequence, ahead: int = 0) -> torch.Generator:
        """The generator of seq's draw `ahead` positions after its next one: keyed by (seed, output
        position) when seeded."""
        p = seq.params
        if p.seed is None:
            return self._gen
        return torch.Generator().manual_seed(draw_seed(p.seed, p.output_offset + len(seq.output_token_ids) + ahead))

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float | None], list[TopLogprobs | None]]:
        """logits: [len(seqs), vocab] float32. Returns token ids, log-probs and top log-probs (None
        where not asked)."""
        logits = logits.cpu()
        raw = logits
        masks = [(i, self._banned(s)) for i, s in enumerate(seqs)]
        masks = [(i, b) for i, b in masks if b]
        if masks:
            logits = logits.clone()
            for i, banned in masks:
                logits[i, banned] = float("-inf")
        tokens = logits.argmax(dim=-1).tolist()
        for i, s in enumerate(seqs):
            p = s.params
            if p.greedy:
                continue
            tokens[i] = self._draw(logits[i], p.temperature, p.top_k, p.top_p, self.generator_for(s))
        logprobs: list[float | None] = [None] * len(seqs)
        tops: list[TopLogprobs | None] = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs or s.params.top_logprobs]
        if want:
            lp = torch.log_softmax(raw[want], dim=-1)
            k = max(seqs[i].params.top_logprobs for i in want)
            if k:
                top_v, top_i = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
                top_v, top_i = top_v.tolist(), top_i.tolist()
            for j, i in enumerate(want):
                logprobs[i] = float(lp[j, tokens[i]])
                n = seqs[i].params.top_logprobs
                if n:
                    tops[i] = list(zip(top_i[j][:n], top_v[j][:n]))
        return tokens, logprobs, tops

    def verify(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]) -> list[tuple[list[int], list[float], list[TopLogprobs]]]:
        """Speculative decoding: logits [sum(len(d) + 1), vocab], each sequence's rows in order (row j:
        the position after its j-th draft). Per sequence: the tokens it keeps (the drafts the sampler's
        own choice at each position agrees with, then that choice at the first disagreement or after
        the last draft), their log-probs and top log-probs (empty where not asked). Each position is
        chosen exactly as `sample` would choose it there: greedy argmax, or the draw of that position's
        generator (see speculative.py for why that is the rejection rule)."""
        logits = logits.cpu()
        raw = logits
        starts, at = [], 0
        for d in drafts:
            starts.append(at)
            at += len(d) + 1
        masks = [(starts[i] + j, b) for i, s in enumerate(seqs) for j in range(len(drafts[i]) + 1) if (b := self._banned(s, j))]
        if masks:
            logits = logits.clone()
            for row, banned in masks:
                logits[row, banned] = float("-inf")
        best = logits.argmax(dim=-1).tolist()
        kept: list[list[int]] = []
        for i, s in enumerate(seqs):
            p, d, a = s.params, drafts[i], starts[i]
            toks = []
            for j in range(len(d) + 1):
                t = best[a + j] if p.greedy else self._draw(logits[a + j], p.temperature, p.top_k, p.top_p, self.generator_for(s, j))
                toks.append(t)
                if j == len(d) or t != d[j]:
                    break
            kept.append(toks)
        out: list[tuple[list[int], list[float], list[TopLogprobs]]] = [(t, [], []) for t in kept]
        want = [i for i, s in enumerate(seqs) if s.params.logprobs or s.params.top_logprobs]
        if want:
            rows = [starts[i] + j for i in want for j in range(len(kept[i]))]
            lp = torch.log_softmax(raw[rows], dim=-1)
            k = max(seqs[i].params.top_logprobs for i in want)
            if k:
                top_v, top_i = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
                top_v, top_i = top_v.tolist(), top_i.tolist()
            r = 0
            for i in want:
                n = seqs[i].params.top_logprobs
                for t in kept[i]:
                    out[i][1].append(float(lp[r, t]))
                    if n:
                        out[i][2].append(list(zip(top_i[r][:n], top_v[r][:n])))
                    r += 1
        return out

    def _banned(self, seq: Sequence, ahead: int = 0) -> list[int]:
        """Token ids seq may not pick `ahead` positions after its next: its stop ids and EOS while
        below min_tokens."""
        p = seq.params
        if p.output_offset + len(seq.output_token_ids) + ahead >= p.min_tokens:
            return []
        return list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos))

    @staticmethod
    def _draw(row: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
        row = row / temperature
        if top_k and top_k < row.shape[0]:
            kth = torch.topk(row, top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            cum = sorted_p.cumsum(0)
            drop = cum - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=gen))


_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, position: int) -> int:
    """A 63-bit seed for draw `position` of a request seeded with `seed` (splitmix64 of the pair), so
    neighbouring positions and seeds get unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1
