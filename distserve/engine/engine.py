"""The engine: admission, one scheduling step at a time, and the KV handoff hooks.

A request enters with `add_request` (to be prefilled here) or `reserve` + `admit_prefilled` (its KV
was computed elsewhere and is imported into blocks reserved first). Each `step` runs one forward
pass and returns a `RequestOutput` per sequence that got a token or finished. Each step's time is fed to
`step_times` (the online fit of step time against tokens in the step); with a TPOT target, a chunked
step that carries running decodes takes only the prompt tokens that keep it within the target.
Finished sequences free their blocks in that step; on a prefill-only engine a prefilled sequence is HELD instead, and its
blocks are freed by `free` (lease released or expired). `abort` frees whatever a request holds.
With `prefix_caching` (workers turn it on) a prompt starts after the longest prefix of its full blocks this
engine has cached, and every block a step completes (or an import brings in) is cached for later
prompts until its space is needed (scheduler.py, block_manager.py, docs/prefix-caching.md).
With `speculative="ngram"` (decode and colocated modes) a step's decodes may carry draft tokens, verified
in the same forward pass; a sequence then gets several tokens in one output (see `speculative`).

Not thread-safe: one engine thread owns it (see `distserve.engine.worker`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from distserve.engine.block_manager import BlockManager, blocks_needed
from distserve.engine.config import EngineConfig
from distserve.errors import InvalidRequest, NotFound, ResourceExhausted
from distserve.engine.kv_cache import PagedKVCache
from distserve.engine.model_runner import ModelRunner
from distserve.engine.prefix import root_hash
from distserve.engine.models import LoadedModel
from distserve.engine.sampler import Sampler, TopLogprobs
from distserve.engine.sampling import SamplingParams, find_stop, validate_request
from distserve.engine.scheduler import Scheduler, SchedulerOutput
from distserve.engine.sequence import FinishReason, Sequence, SequenceStatus
from distserve.engine.speculative import build as build_speculator
from distserve.engine.step_times import BlockCredit, StepAccount, StepPredictor, StepTimes, chunk_budget
from distserve.engine.weights import load as load_weights
from distserve.engine.weights import resolve_format
from distserve.tokenization import IncrementalDetokenizer

log = logging.getLogger(__name__)

@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # tokens produced in this step (0 or 1; more when speculative drafts were accepted)
    new_logprobs: list[float]  # their log-probs, when asked for
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    held: bool = False  # prefill-only engine: KV kept for export
    held_blocks: tuple[int, ...] = ()  # when held: the blocks holding the prompt's KV (owned until `free`)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    queue_s: float = 0.0  # set with the first token: arrival to first scheduled
    prefill_s: float = 0.0  # set with the first token: first scheduled to first token
    new_top_logprobs: list[TopLogprobs] = field(default_factory=list)  # per new token, when top_logprobs is asked: (id, log-prob), best first


@dataclass(frozen=True, slots=True)
class EngineStats:
    queued_requests: int
    queued_tokens: int  # prompt tokens not yet computed
    running_requests: int
    held_requests: int
    free_blocks: int
    total_blocks: int
    block_size: int
    step_fixed_s: float = 0.0  # the step-time fit's fixed cost (0 = nothing measured yet)
    step_token_s: float = 0.0  # ... its cost per prompt token in a step
    step_decode_s: float = 0.0  # ... and per decode token (a running sequence's)
    max_step_tokens: int = 0  # token budget of one step
    prefill_budget_tokens: int = 0  # chunked engines: prompt tokens a step may carry now within the TPOT target, with the running batch (0 = none, or not chunked)
    prefix_cached_blocks: int = 0  # blocks holding a cached prefix (in use or evictable)
    prefix_query_tokens: int = 0  # prompt tokens admitted since start, with prefix caching on
    prefix_hit_tokens: int = 0  # ... of which were taken from the cache
    prefix_evictions: int = 0  # cached blocks reused for other data since start
    prefix_version: int = 0  # changes whenever the set of cached prefix hashes does
    spec_drafted_tokens: int = 0  # speculative decoding, since start: draft tokens verified
    spec_accepted_tokens: int = 0  # ... of which accepted
    decode_seq_steps: int = 0  # sequence-steps of decoding (one per running sequence per step), since start
    decode_seq_tokens: int = 0  # tokens they produced (= decode_seq_steps without speculation)
    # where the engine's time went since start (step_times.StepAccount), by step_times.STEP_KINDS
    step_seconds: tuple[float, ...] = (0.0, 0.0, 0.0)  # in steps, schedule to sampled tokens
    step_counts: tuple[int, ...] = (0, 0, 0)
    prompt_tokens_computed: int = 0  # prompt tokens its steps ran (prefix-cache hits excluded)


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig(), step_predictor: StepPredictor | None = None):
        """`step_predictor` sets the chunk budget under a TPOT target (default: this engine's own
        measured `step_times`; a planner profile's step model, say)."""
        self.loaded = loaded
        self._text = loaded  # what stop strings are decoded with (LoadedModel.decode)
        self.config = config
        model = loaded.model
        self.vocab_size = model.config.vocab_size
        self.max_model_len = loaded.max_model_len
        dtype = torch.int8 if config.kv_dtype == "int8" else next(model.parameters()).dtype
        layout = ModelRunner.layout_of(model, config.block_size, dtype)
        num_blocks = config.num_blocks or max(1, config.kv_cache_bytes // layout.bytes_per_block)
        self.cache = PagedKVCache(layout, num_blocks, loaded.device)
        self.blocks = BlockManager(num_blocks, config.block_size)
        fmt = resolve_format(config.weights, loaded)
        share = fmt == "int8" if config.share_weights == "auto" else config.share_weights
        runner_weights = load_weights(loaded, fmt, share)
        self.runner = ModelRunner(model, self.cache, self.max_model_len, runner_weights, config.prefill_gemm)
        if config.free_model_weights:
            loaded.drop_weights()
        gemm = self.runner.prefill_gemm if fmt == "int8" and loaded.device.type == "cpu" else ""  # elsewhere: widened per call
        log.info("%s weights (%s, %.0f MB%s), %s KV cache of %d blocks", fmt,
                 f"mapped read-only from {runner_weights.path}" if runner_weights.mapped else "private",
                 runner_weights.nbytes / 1e6, f", prefill batches: {gemm}" if gemm else "", "int8" if layout.quantized else str(dtype).removeprefix("torch."), num_blocks)
        tag = "|gemm=bf16" if gemm == "bf16" else ""  # its KV is not the fp32 path's to the last bits
        self.prefix_root = root_hash(f"{loaded.name}|{loaded.fingerprint}|seed={loaded.seed}|weights={fmt}{tag}",
                                     str(dtype).removeprefix("torch."), config.block_size)  # names this engine's cached blocks
        self.sampler = Sampler(config.seed, tuple(loaded.eos_token_ids))
        self.speculator = build_speculator(config, loaded, self.runner, fmt, share, num_blocks, dtype)
        self.step_times = StepTimes()
        self.account = StepAccount()
        self.step_predictor = step_predictor or self.step_times.predict
        self.scheduler = self._scheduler(config)
        self.eos = frozenset(loaded.eos_token_ids)
        self._seqs: dict[str, Sequence] = {}  # every request that holds or awaits blocks
        self.last_forward_s = 0.0  # duration of the latest forward pass (for overhead accounting)
        self.chunk_credit = BlockCredit()  # how chunk_cap spends budgets below a block

    @property
    def layout(self):
        return self.cache.layout

    def _scheduler(self, config: EngineConfig) -> Scheduler:
        chunked = config.chunked_prefill and config.mode != "prefill"
        return Scheduler(
            self.blocks,
            config.max_num_batched_tokens,
            config.max_num_seqs,
            chunked,
            hold_after_prefill=config.mode == "prefill",
            chunk_cap=self.chunk_cap if chunked and config.tpot_target_s > 0 else None,
            prefix_root=self.prefix_root if config.prefix_caching else None,
        )

    # what an idle engine may change (a worker changing role); the cache, weights and sampling stay
    RECONFIGURABLE = frozenset({"mode", "max_num_batched_tokens", "max_num_seqs", "chunked_prefill", "tpot_target_s"})

    def reconfigure(self, config: EngineConfig) -> None:
        """Takes a new mode (prefill or decode) and scheduling settings. Only while it holds no request,
        so no sequence changes hands between two policies. The step-time fit is kept."""
        changed = {f for f in EngineConfig.__dataclass_fields__ if getattr(config, f) != getattr(self.config, f)}
        if changed - self.RECONFIGURABLE:
            raise InvalidRequest("config", f"{', '.join(sorted(changed - self.RECONFIGURABLE))} cannot change while the engine lives")
        if self._seqs:
            raise ResourceExhausted(f"{len(self._seqs)} requests still hold or await blocks here")
        self.config = config
        old, self.scheduler = self.scheduler, self._scheduler(config)
        self.scheduler.prefix_query_tokens, self.scheduler.prefix_hit_tokens = old.prefix_query_tokens, old.prefix_hit_tokens

    # -- admission ---------------------------------------------------------------------------
    def _new_seq(self, request_id: str, prompt: list[int], params: SamplingParams) -> Sequence:
        if request_id in self._seqs:
            raise InvalidRequest("request_id", f"{request_id!r} is already in this engine")
        validate_request(prompt, params, self.vocab_size, self.max_model_len)
        return Sequence(request_id, list(prompt), params, time.monotonic())

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queues a prompt for prefill here. Raises InvalidRequest before touching anything."""
        seq = self._new_seq(request_id, prompt_token_ids, params)
        if self.scheduler.blocks_for(seq) > self.blocks.num_blocks:
            raise InvalidRequest("max_tokens", f"request needs more KV blocks than this worker has ({self.blocks.num_blocks})")
        self._seqs[request_id] = seq
        self.scheduler.waiting.append(seq)

    def can_reserve(self, num_prompt_tokens: int, params: SamplingParams) -> bool:
        need = blocks_needed(num_prompt_tokens, params.max_tokens, self.config.block_size)
        return self.blocks.can_allocate(need) and len(self.scheduler.running) < self.config.max_num_seqs

    def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Reserves every block a request with transferred KV will need (before the KV is pulled).
        Raises ResourceExhausted when they are not free now."""
        seq = self._new_seq(request_id, prompt_token_ids, params)
        need = seq.blocks_needed(self.config.block_size)
        if not self.blocks.can_allocate(need):
            raise ResourceExhausted(f"{need} KV blocks needed, {self.blocks.num_free} free")
        seats = len(self.scheduler.running) + self._reserved()
        if seats >= self.config.max_num_seqs:  # a reserved request must find a seat in the batch when it arrives
            raise ResourceExhausted(f"{seats} sequences running or reserved, max_num_seqs {self.config.max_num_seqs}")
        seq.block_table = self.blocks.allocate(need)
        seq.first_scheduled_s = time.monotonic()
        self._seqs[request_id] = seq

    def _reserved(self) -> int:
        """Requests holding reserved blocks whose KV has not arrived yet."""
        return sum(1 for s in self._seqs.values() if s.status is SequenceStatus.WAITING and s.block_table)

    def admit_prefilled(self, request_id: str, first_token: int, first_logprob: float | None, kv: torch.Tensor) -> RequestOutput | None:
        """Writes transferred KV into the reserved blocks and starts decoding after `first_token`.
        Returns a finished output when the first token already ends the request."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is not SequenceStatus.WAITING or not seq.block_table:
            raise NotFound(f"no reservation for request {request_id!r}")
        if kv.shape[2] != seq.num_prompt_tokens:
            raise InvalidRequest("kv", f"KV holds {kv.shape[2]} tokens, the prompt has {seq.num_prompt_tokens}")
        if not 0 <= first_token < self.vocab_size:
            raise InvalidRequest("first_token", f"token id {first_token} is outside the vocabulary")
        self.cache.load(seq.block_table, kv)
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.scheduler.cache_computed(seq)  # imported blocks serve later prompts here too (a local prefill of the next turn)
        seq.status = SequenceStatus.RUNNING
        self._append(seq, first_token, first_logprob)
        if seq.status is SequenceStatus.FINISHED:  # the first token already ends it: nothing to decode
            del self._seqs[request_id]
            self._free_blocks(seq)
            return self._output(seq, [first_token])
        self.scheduler.running.append(seq)
        return None

    # -- lifecycle ---------------------------------------------------------------------------
    def abort(self, request_id: str) -> bool:
        """Drops a request wherever it is and frees its blocks. False if it was unknown."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = seq.finish_reason or FinishReason.CANCELLED
        self._free_blocks(seq)
        return True

    def free(self, request_id: str) -> bool:
        """Frees a HELD sequence (its KV lease ended)."""
        return self.abort(request_id)

    def export_kv(self, request_id: str) -> torch.Tensor:
        """A contiguous copy of a held sequence's prompt KV: [layers, 2, tokens, kv_heads, head_dim]."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is not SequenceStatus.HELD:
            raise NotFound(f"no held KV for request {request_id!r}")
        return self.cache.export(seq.block_table, seq.num_prompt_tokens)

    def request_ids(self) -> list[str]:
        """Every request that holds or awaits blocks here."""
        return list(self._seqs)

    def has_work(self) -> bool:
        s = self.scheduler
        return bool(s.waiting or s.prefilling or s.running)

    def prefill_budget(self, decodes: list[Sequence]) -> int:
        """Prompt tokens a step of these decodes may carry within the TPOT target (0: none)."""
        cfg = self.config
        room = cfg.max_num_batched_tokens - len(decodes)
        if cfg.tpot_target_s <= 0:
            return room
        if not decodes:
            if cfg.mode != "decode":
                return room  # a colocated step with no decode delays only prompts, whose TTFT it serves
            # a request joins a decode worker with its first token already out (its KV came from a
            # prefill worker): a step run with no decode is the gap before its next token, so it keeps
            # within the target as a step of one decode does
            return chunk_budget(self.step_predictor, cfg.tpot_target_s, 1, 0, room)
        context = sum(s.num_tokens for s in decodes)
        return chunk_budget(self.step_predictor, cfg.tpot_target_s, len(decodes), context, room)

    def chunk_cap(self, decodes: list[Sequence]) -> int:
        """The scheduler's cap: the budget. Where that is less than a block, steps carry no prompt
        token until their budgets add up to a block, and then one block: the prompt advances at the
        budget's rate, and the decodes' time per token keeps within the target on average instead of
        passing it at every step. However small the budget, a prompt already admitted advances by a
        block at least every CREDIT_STEPS steps."""
        room = self.config.max_num_batched_tokens - len(decodes)
        budget = self.prefill_budget(decodes)
        block = min(room, self.config.block_size)
        return self.chunk_credit.cap(budget, block)

    def prefix_hashes(self) -> tuple[int, list[int]]:
        """The cache's version and every prefix hash it holds (for publishing; run on the engine thread)."""
        return self.blocks.version, self.blocks.cached_hashes()

    def stats(self) -> EngineStats:
        s = self.scheduler
        fit = self.step_times.fit
        seconds, counts, prompt_tokens = self.account.snapshot()
        return EngineStats(
            queued_requests=len(s.waiting) + len(s.prefilling),
            queued_tokens=s.queued_tokens,
            running_requests=len(s.running),
            held_requests=sum(1 for q in self._seqs.values() if q.status is SequenceStatus.HELD),
            free_blocks=self.blocks.num_free,
            total_blocks=self.blocks.num_blocks,
            block_size=self.config.block_size,
            step_fixed_s=fit.fixed_s if fit else 0.0,
            step_token_s=fit.token_s if fit else 0.0,
            step_decode_s=fit.decode_s if fit else 0.0,
            max_step_tokens=self.config.max_num_batched_tokens,
            prefill_budget_tokens=self.prefill_budget(s.running[: self.config.max_num_seqs]) if s.chunked else 0,
            prefix_cached_blocks=self.blocks.num_cached,
            prefix_query_tokens=s.prefix_query_tokens,
            prefix_hit_tokens=s.prefix_hit_tokens,
            prefix_evictions=self.blocks.evictions,
            prefix_version=self.blocks.version,
            spec_drafted_tokens=self.speculator.counters.drafted,
            spec_accepted_tokens=self.speculator.counters.accepted,
            decode_seq_steps=self.speculator.counters.decode_steps,
            decode_seq_tokens=self.speculator.counters.decode_tokens,
            step_seconds=seconds,
            step_counts=counts,
            prompt_tokens_computed=prompt_tokens,
        )

    # -- the step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t_step = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.empty:
            return []
        to_sample = list(sched.decode)
        sample_flags = []
        for c in sched.chunks:
            done = c.end >= c.seq.num_prompt_tokens
            sample_flags.append(done)
            if done:
                to_sample.append(c.seq)
        drafts = self._drafts(sched)
        batch = self.runner.prepare(sched.decode, sched.chunks, sample_flags, drafts)
        t0 = time.perf_counter()
        logits = self.runner.forward(batch)
        self.last_forward_s = time.perf_counter() - t0
        outs = self._postprocess(sched, to_sample, logits, drafts)
        # draft rows count as what they cost, prompt tokens (see _drafts): a decode-only worker learns
        # their price from its own speculative steps instead of charging each the attention pass of a sequence
        drafted = batch.num_decode - len(sched.decode)
        prompt_tokens = sum(c.end - c.start for c in sched.chunks)
        seconds = time.perf_counter() - t_step
        self.step_times.observe(len(sched.decode), prompt_tokens + drafted, seconds)
        self.account.add(len(sched.decode), prompt_tokens, seconds)
        return outs

    def _drafts(self, sched: SchedulerOutput) -> list[list[int]] | None:
        """Speculative drafts of the step's decodes (None: a plain decode step)."""
        spec = self.speculator
        if not spec.config.enabled or not sched.decode or self.scheduler.hold_after_prefill:
            return None
        room = self.config.max_num_batched_tokens - len(sched.decode) - sum(c.end - c.start for c in sched.chunks)
        fit = self.step_times.fit
        fixed = fit.fixed_s if fit else 0.0
        # a draft row shares its sequence's pass over the KV (the kernel attends a sequence's rows
        # together), so it costs what a prompt token of a chunk costs, not what a sequence's decode does
        return spec.propose(sched.decode, room, fixed, max(fit.token_s, 0.01 * fixed) if fit else 0.0)

    def _verify(self, seqs: list[Sequence], drafts: list[list[int]], logits: torch.Tensor) -> list[RequestOutput]:
        """Keeps each sequence's accepted drafts and the token after them (see speculative.py); the
        rejected drafts' KV slots lie past num_computed_tokens and are overwritten later."""
        spec = self.speculator
        spec.counters.spec_steps += 1
        outs = []
        for seq, d, (toks, lps, tops) in zip(seqs, drafts, self.sampler.verify(logits, seqs, drafts)):
            if d:
                spec.record(seq, len(d), len(toks) - 1)
            kept = 0
            for t in toks:
                self._append(seq, t, lps[kept] if lps else None)
                kept += 1
                if seq.status is SequenceStatus.FINISHED:  # EOS, a stop string or max_tokens: the rest is dropped
                    break
            seq.num_computed_tokens += kept
            self.scheduler.cache_computed(seq)  # before a finished one frees its blocks: they stay cached
            spec.counters.decode_steps += 1
            spec.counters.decode_tokens += kept
            if seq.status is SequenceStatus.FINISHED:
                self.scheduler.remove(seq)
                del self._seqs[seq.request_id]
                self._free_blocks(seq)
            out = self._output(seq, toks[:kept], lps[:kept])
            if tops:
                out.new_top_logprobs = tops[:kept]
            outs.append(out)
        return outs

    def _postprocess(self, sched: SchedulerOutput, to_sample: list[Sequence], logits: torch.Tensor,
                     drafts: list[list[int]] | None = None) -> list[RequestOutput]:
        verified: list[RequestOutput] = []
        if drafts is not None:  # the decodes' rows come first, each sequence's in order
            rows = len(sched.decode) + sum(len(d) for d in drafts)
            verified = self._verify(sched.decode, drafts, logits[:rows])
            to_sample, logits = to_sample[len(sched.decode):], logits[rows:]
        else:
            for s in sched.decode:
                s.num_computed_tokens += 1
                self.scheduler.cache_computed(s)
            self.speculator.counters.decode_steps += len(sched.decode)
            self.speculator.counters.decode_tokens += len(sched.decode)
        for c in sched.chunks:
            c.seq.num_computed_tokens = c.end
            self.scheduler.cache_computed(c.seq)
        tokens, logprobs, tops = self.sampler.sample(logits, to_sample) if to_sample else ([], [], [])
        now = time.monotonic()
        outs = verified
        for seq, tok, lp, top in zip(to_sample, tokens, logprobs, tops):
            first = not seq.output_token_ids
            if first and seq in self.scheduler.prefilling:
                self.scheduler.prefilling.remove(seq)
            self._append(seq, tok, lp)
            if seq.status is SequenceStatus.FINISHED:
                self.scheduler.remove(seq)
                del self._seqs[seq.request_id]
                self._free_blocks(seq)
            elif self.scheduler.hold_after_prefill:
                seq.status = SequenceStatus.HELD
            elif first:
                self.scheduler.running.append(seq)
            out = self._output(seq, [tok], [lp] if lp is not None else [])
            if top is not None:
                out.new_top_logprobs = [top]
            if first:
                out.queue_s = (seq.first_scheduled_s or now) - seq.arrival_s
                out.prefill_s = now - (seq.first_scheduled_s or now)
            outs.append(out)
        return outs

    def _append(self, seq: Sequence, tok: int, lp: float | None) -> None:
        seq.output_token_ids.append(tok)
        if lp is not None:
            seq.output_logprobs.append(lp)
        p = seq.params
        # before min_tokens (counting tokens made before a replay) nothing but max_tokens ends it;
        # stop strings are still matched so only text after min_tokens is searched, as vLLM does
        early = p.output_offset + len(seq.output_token_ids) < p.min_tokens
        if not early and (tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos)):
            seq.finish_reason = FinishReason.STOP
        elif p.stop and self._hit_stop_string(seq) and not early:
            seq.finish_reason = FinishReason.STOP
        elif len(seq.output_token_ids) >= p.max_tokens:
            seq.finish_reason = FinishReason.LENGTH
        if seq.finish_reason is not None:
            seq.status = SequenceStatus.FINISHED

    def _hit_stop_string(self, seq: Sequence) -> bool:
        """Whether the text the newest token completes ends a stop string. The text grows token by
        token (tokenization.IncrementalDetokenizer, as the router streams it): decoding the whole
        output at every token cost time in the square of its length."""
        if seq.detok is None:
            seq.detok = IncrementalDetokenizer(self._text, skip_special_tokens=True)
            if len(seq.output_token_ids) > 1:  # tokens appended before stops were looked at (none today)
                seq.detok.add(seq.output_token_ids[:-1])
        before = len(seq.detok.text)
        seq.detok.add(seq.output_token_ids[-1:])
        # with what it holds back (an incomplete character), as the whole output decoded would read
        return find_stop(seq.detok.text + seq.detok.pending(), seq.params.stop, before) is not None

    def _output(self, seq: Sequence, toks: list[int], lps: list[float] | None = None) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=toks,
            new_logprobs=lps or [],
            finished=seq.status is SequenceStatus.FINISHED,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=len(seq.output_token_ids),
            held=seq.status is SequenceStatus.HELD,
            held_blocks=tuple(seq.block_table) if seq.status is SequenceStatus.HELD else (),
            num_cached_tokens=seq.num_cached_tokens,
        )

    def _free_blocks(self, seq: Sequence) -> None:
        if seq.spec is not None:
            self.speculator.release(seq)
        if seq.block_table:
            self.blocks.free(seq.block_table)
            seq.block_table = []
