"""Speculative decoding on the decode side: drafting by prompt lookup, how many drafts each request
gets, and the bookkeeping of their acceptance.

One decode step with speculation (`LLMEngine.step`):
1. the scheduler picks the running sequences as usual;
2. `Speculator.propose` drafts up to k tokens per sequence by n-gram lookup (`NgramIndex`: the last n
   tokens of prompt + output matched against an earlier place in them, longest n first, most recent
   place first; the tokens that followed it are the draft) and keeps only the drafts that pay
   (below);
3. the runner feeds each sequence's last token and its drafts as consecutive decode rows: row j sits
   at position num_tokens - 1 + j and attends to the context up to and including itself, through the
   same paged decode attention as a plain decode (causal by construction, fp32 or int8 cache), and
   writes their K/V into slots the sequence reserved at admission (`blocks_needed` reserves for
   max_tokens, and k never passes the tokens it may still make, so drafts need no extra block);
4. `Sampler.verify` takes, row by row, the token the sampler would choose at that output position
   (greedy: the argmax; sampled: the draw of that position's generator, as without speculation) and
   accepts the draft while the two agree; the first disagreement's target token, or the bonus token
   after k accepted drafts, ends the row run. For a deterministic draft d this is the rejection rule
   exactly: d is accepted with probability p(d), and on rejection the emitted token is distributed as
   p with d's mass removed, renormalised. So greedy output is token-identical to no speculation and a
   seeded sampled request gets the very tokens it would get without it;
5. the engine appends the emitted tokens one by one with the usual stop checks (EOS, stop strings,
   max_tokens end the request at the token that meets them, the rest are dropped). Rollback of the
   rejected drafts' KV is bookkeeping: `num_computed_tokens` advances by the tokens kept, so their
   slots lie past it and the next step overwrites them.

How many drafts pay (`Speculator.propose`): each request keeps an estimate of the probability a that
its next draft token is accepted, per match class (the length of the n-gram its draft matched: on the
rewrite workload a 4-gram match's first draft token is accepted 91% of the time, a 2-gram's 47%, and
four tokens deep 64% against 18%), decayed by `DECAY` per verification and pulled towards the engine's
own estimate for that class (two pseudo-trials; the engine's counts decay by `ENGINE_DECAY`), so a new
request starts from what the others taught (acceptance is counted per trial, a run of accepted drafts
and at most one rejection, the maximum-likelihood estimate for a geometric run). The j-th draft of a
request adds a^j expected tokens and costs one more row of the step, whose price comes from the
engine's step-time fit (fixed cost a0, cost per row c). Drafts are taken greedily, most likely first, while a^j > MARGIN * c * E / T
(E: expected tokens of the step so far, T: its predicted seconds) and a^j >= `min_accept`, and
while the step has room in its token budget. A request whose drafts keep failing falls to k = 0; its
estimate drifts back towards the prior by `IDLE_DECAY` per step without drafts, so it is probed again
now and then. A step where no request has a draft that pays is a plain decode step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

METHODS = ("none", "ngram", "draft")
DECAY = 0.8  # weight of past verifications in a request's acceptance estimate, per verification
ENGINE_DECAY = 0.99  # ... in the engine's estimate per match class (every request's), the prior of a request's
IDLE_DECAY = 0.98  # ... per step where it drafted nothing although it had a draft (drift back to the prior)
MARGIN = 1.1  # a draft must bring this many times its row's cost (its price is measured: draft rows are fitted as prompt tokens)
DEFAULT_ROW_FRACTION = 0.05  # before the step-time fit exists: a row's cost as a share of the fixed cost

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SpecConfig:
    method: str = "none"  # none | ngram | draft (a draft model, distserve.engine.draft)
    max_k: int = 5  # most drafts per request and step
    ngram_max: int = 4  # longest suffix matched
    ngram_min: int = 2  # shortest suffix matched
    min_accept: float = 0.2  # a draft whose acceptance probability is predicted below this is not verified
    adaptive: bool = True  # False: verify every draft found, up to max_k (tests, and measuring what adaptivity saves)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative must be one of {METHODS}, got {self.method!r}")
        if self.max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {self.max_k}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if not 0.0 <= self.min_accept < 1.0:
            raise ValueError(f"min_accept must be in [0, 1), got {self.min_accept}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


class NgramIndex:
    """Where each n-gram of a token list last ended, for n in [n_min, n_max], kept up to date as the
    list grows. `draft(k)` looks up the list's own suffix and returns the (at most k) tokens that
    followed its most recent earlier occurrence, longest suffix first."""

    __slots__ = ("tokens", "n_min", "n_max", "ends", "indexed", "last_n")

    def __init__(self, tokens: list[int], n_min: int, n_max: int):
        self.tokens = tokens  # prompt + output, appended to by `sync`
        self.n_min, self.n_max = n_min, n_max
        self.ends: list[dict[tuple[int, ...], int]] = [{} for _ in range(n_max + 1)]  # [n][ngram] -> end
        self.indexed = 0  # every end e < indexed is in `ends`
        self.last_n = 0  # length of the suffix the latest draft matched (0: none)

    def sync(self, prompt_len: int, output: list[int]) -> None:
        have = len(self.tokens) - prompt_len
        if have < len(output):
            self.tokens.extend(output[have:])

    def draft(self, k: int) -> list[int]:
        t = self.tokens
        L = len(t)
        ends = self.ends
        for e in range(max(self.indexed, self.n_min), L):  # index every end before the suffix's own
            for n in range(self.n_min, min(self.n_max, e) + 1):
                ends[n][tuple(t[e - n : e])] = e
        self.indexed = max(self.indexed, L)
        for n in range(min(self.n_max, L - 1), self.n_min - 1, -1):
            e = ends[n].get(tuple(t[L - n :]))
            if e is not None and e < L:
                self.last_n = n
                return t[e : e + k]
        self.last_n = 0
        return []


@dataclass(slots=True)
class Acceptance:
    """Decayed counts of accepted drafts and of trials (accepted + first rejections), per match class
    (the n-gram length a draft matched; 0 for a draft model's drafts)."""

    accepted: dict[int, float] = field(default_factory=dict)
    trials: dict[int, float] = field(default_factory=dict)

    def record(self, cls: int, accepted: int, rejected: bool, decay: float) -> None:
        self.accepted[cls] = self.accepted.get(cls, 0.0) * decay + accepted
        self.trials[cls] = self.trials.get(cls, 0.0) * decay + accepted + rejected

    def fade(self, cls: int, decay: float) -> None:
        if cls in self.trials:
            self.accepted[cls] *= decay
            self.trials[cls] *= decay

    def prob(self, cls: int, prior: float, weight: float = 2.0) -> float:
        """The estimate, with `weight` pseudo-trials at `prior`."""
        return (self.accepted.get(cls, 0.0) + weight * prior) / (self.trials.get(cls, 0.0) + weight)


@dataclass(slots=True)
class SpecState:
    """One request's drafting state (kept on its Sequence)."""

    index: NgramIndex | None  # n-gram drafting
    seen: Acceptance = field(default_factory=Acceptance)  # this request's verifications
    cls: int = 0  # match class of its latest draft (NgramIndex.last_n)
    draft: object | None = None  # draft-model drafting: its blocks and progress (draft.DraftState)
    base_tokens: int = 0  # the sequence's tokens when its latest drafts were made


@dataclass(slots=True)
class SpecCounters:
    """Cumulative figures since the engine started (EngineStats carries them to metrics)."""

    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # ... of which accepted
    decode_steps: int = 0  # sequence-steps of decoding (one per running sequence per step)
    decode_tokens: int = 0  # tokens those sequence-steps produced
    spec_steps: int = 0  # engine steps that verified at least one draft


@dataclass(slots=True)
class Speculator:
    config: SpecConfig
    counters: SpecCounters = field(default_factory=SpecCounters)
    draft: object | None = None  # method "draft": the distserve.engine.draft.DraftModel
    draft_ratio: float = 0.25  # a draft round's cost as a share of a target step's fixed cost, until measured
    seen: Acceptance = field(default_factory=Acceptance)  # every request's verifications, per match class

    def accept_prob(self, st: SpecState) -> float:
        """Probability that the next draft token of a request is accepted: its own recent record for
        drafts of this match class, starting from what the engine has seen for the class (a 4-gram
        match in copied text is accepted far more often than a 2-gram one: 0.91 against 0.47 for the
        first draft token on the rewrite workload)."""
        return st.seen.prob(st.cls, self.seen.prob(st.cls, 0.5))

    def state(self, seq) -> SpecState:
        st = seq.spec
        if st is None:
            cfg = self.config
            index = NgramIndex(list(seq.prompt_token_ids), cfg.ngram_min, cfg.ngram_max) if self.draft is None else None
            st = seq.spec = SpecState(index)
        if st.index is not None:
            st.index.sync(seq.num_prompt_tokens, seq.output_token_ids)
        return st

    def release(self, seq) -> None:
        """seq leaves the engine: its draft-cache blocks go back."""
        if self.draft is not None:
            self.draft.release(seq)

    def _propose_draft(self, decodes: list, room: int, fixed_s: float, row_s: float) -> list[list[int]] | None:
        """Draft model: one k for the batch (every round is a forward pass of the draft for all), the
        one with the most expected tokens per predicted second; requests below min_accept sit out."""
        cfg = self.config
        caps, alphas = [], []
        for seq in decodes:
            st = self.state(seq)
            a = self.accept_prob(st)
            cap = min(cfg.max_k, seq.params.max_tokens - len(seq.output_token_ids) - 1)
            caps.append(cap if (a >= cfg.min_accept or not cfg.adaptive) else 0)
            alphas.append(a)
            if cap > 0 and a < cfg.min_accept and cfg.adaptive:
                st.seen.fade(st.cls, IDLE_DECAY)
        if not any(caps):
            return None
        measured = self.draft.round_s if fixed_s > 0 and self.draft.round_s > 0 else 0.0
        if fixed_s <= 0:
            fixed_s, row_s = 1.0, DEFAULT_ROW_FRACTION
        round_s = measured or fixed_s * self.draft_ratio
        B = len(decodes)
        best_k, best = 0, B / (fixed_s + row_s * B)
        for K in range(1, cfg.max_k + 1):
            ks = [min(K, c) for c in caps]
            if sum(ks) > room:
                break
            expected = B + sum(sum(a ** j for j in range(1, k + 1)) for a, k in zip(alphas, ks))
            rate = expected / (fixed_s + row_s * (B + sum(ks)) + K * round_s)
            if not cfg.adaptive or rate > best * (1 + 0.05 * (K - best_k)):
                best_k, best = K, rate
        if best_k == 0:
            return None
        drafts = self.draft.propose(decodes, [min(best_k, c) for c in caps])
        for seq in decodes:
            seq.spec.base_tokens = seq.num_tokens
        return drafts if any(drafts) else None

    def propose(self, decodes: list, room: int, fixed_s: float, row_s: float) -> list[list[int]] | None:
        """Drafts per sequence (same order), or None when none pays. `room`: rows the step's token
        budget has left beyond one per sequence; fixed_s / row_s: the step-time fit (0: unknown)."""
        cfg = self.config
        if room <= 0 or not decodes:
            return None
        if self.draft is not None:
            return self._propose_draft(decodes, room, fixed_s, row_s)
        if fixed_s <= 0:
            fixed_s, row_s = 1.0, DEFAULT_ROW_FRACTION
        cands: list[tuple[float, int, int]] = []  # (probability the draft is reached and accepted, seq, j)
        found: list[list[int]] = []
        states = []
        for i, seq in enumerate(decodes):
            k = min(cfg.max_k, seq.params.max_tokens - len(seq.output_token_ids) - 1)
            st = self.state(seq)
            states.append(st)
            d = st.index.draft(k) if k > 0 else []
            found.append(d)
            st.cls = getattr(st.index, "last_n", 0)
            a = self.accept_prob(st)
            p = 1.0
            for j in range(len(d) if cfg.adaptive else 0):
                p *= a
                if p < cfg.min_accept:
                    break
                cands.append((p, i, j))
        take = [0] * len(decodes)
        if not cfg.adaptive:
            for i, d in enumerate(found):
                take[i] = min(len(d), max(0, room))
                room -= take[i]
        elif cands:
            cands.sort(key=lambda c: (-c[0], c[2]))
            tokens = float(len(decodes))
            seconds = fixed_s + row_s * len(decodes)
            for p, i, j in cands:
                if room <= 0 or p <= MARGIN * row_s * tokens / seconds:
                    break
                if j != take[i]:  # its earlier draft was not taken
                    continue
                take[i] = j + 1
                tokens += p
                seconds += row_s
                room -= 1
        drafts = [d[:n] for d, n in zip(found, take)]
        for st, d, n in zip(states, found, take):
            if d and not n:
                st.seen.fade(st.cls, IDLE_DECAY)
        return drafts if any(take) else None

    def record(self, seq, drafted: int, accepted: int) -> None:
        """After verification: `accepted` of the `drafted` drafts of seq agreed with the target."""
        st = seq.spec
        if self.draft is not None:
            self.draft.accepted(seq, st.base_tokens, accepted)
        st.seen.record(st.cls, accepted, accepted < drafted, DECAY)
        self.seen.record(st.cls, accepted, accepted < drafted, ENGINE_DECAY)
        c = self.counters
        c.drafted += drafted
        c.accepted += accepted


def build(config, loaded, runner, fmt: str, share: bool, num_blocks: int, dtype) -> Speculator:
    """The engine's speculator from its EngineConfig: n-gram drafting needs nothing more; draft-model
    drafting loads `config.draft_model` (same tokenizer, its own paged cache) or makes a self-draft of
    the model's first `config.draft_layers` layers and its head."""
    spec = SpecConfig(config.speculative, config.speculative_k, adaptive=config.speculative_adaptive)
    if config.speculative != "draft":
        return Speculator(spec)
    from distserve.engine.draft import DraftModel
    from distserve.engine.weights import load as load_weights

    target_layers = runner.cache.layout.num_layers
    vocab = loaded.model.config.vocab_size
    if config.draft_model:
        from distserve.engine.models import load_model

        dl = load_model(config.draft_model, device=str(loaded.device), dtype=str(loaded.dtype).removeprefix("torch."))
        if dl.model.config.vocab_size != vocab:
            raise ValueError(f"draft model {config.draft_model!r} has {dl.model.config.vocab_size} tokens, the model {vocab}: they must share the tokenizer")
        draft = DraftModel.separate(dl, load_weights(dl, fmt, share), config.block_size, num_blocks, dtype)
        ratio = dl.model.config.num_hidden_layers * dl.model.config.hidden_size / (target_layers * loaded.model.config.hidden_size)
    else:
        layers = config.draft_layers or max(1, target_layers // 4)
        draft = DraftModel.self_draft(runner, layers, num_blocks, loaded.max_model_len)
        ratio = layers / target_layers
    log.info("speculative decoding with a %s", draft.name)
    return Speculator(spec, draft=draft, draft_ratio=ratio)
