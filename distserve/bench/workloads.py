"""Request lists for `distserve bench serve`: lengths, prompts and arrival times, all from one seed.

A workload is a length mix (prompt tokens, output tokens) plus an arrival process. The same seed
gives the same list (lengths, prompt token ids, arrival offsets) on every run, so two serving
systems are measured on identical requests. Prompts are synthetic text made of real English words,
tokenized with the served model's tokenizer and cut to the exact target length; the token ids are
sent where the target accepts them (distserve), the decoded text elsewhere (OpenAI-compatible).

Length mixes are scaled to what a 135M model on 2 CPU cores serves (DESIGN.md section 7):
- chat: ShareGPT-like, prompts 64-384 tokens, outputs 16-128 (both long-tailed);
- code: HumanEval-like, short prompts (32-192), medium outputs (48-192);
- summarize: LongBench-like, long prompts (384-1024), short outputs (8-48);
- rewrite: outputs that draw on the prompt (where speculative decoding by prompt lookup pays), from
  the Python standard library's own source files, which every machine with Python has: "add type
  hints to this function" over functions taken with `ast` from Lib/*.py (two in three requests), and
  "rewrite this documentation as a list, keeping its wording" over their docstrings (one in three);
  prompts go through the model's chat template, outputs end at the model's end of turn (no
  ignore_eos: what a model writes after its answer ends is a new, made-up conversation, which
  draws on nothing in the prompt), at most about as long as the text they rework;
- a JSONL file of `{"prompt": str, "output_len": int}` per line.

Two workloads that repeat themselves, as real traffic does (prefix caching, docs/prefix-caching.md):
- shared-prefix: one long system prompt (768 tokens) before every short question (16-64 tokens),
  short answers (16-64); arrivals as for the mixes above.
- multiturn: conversations of 2-6 turns after a shared system prompt (256 tokens); each turn sends
  the whole history (system prompt, every earlier user message and the answer the server really
  gave) plus a new user message (16-128 tokens), answers 16-96 tokens, and waits a think time
  (exponential, mean 2 s) after an answer before the next turn. Conversations start at the arrival
  process's times at `rate / mean turns`, so `rate` is again the long-run request rate; a turn's
  prompt is built when it is sent (`RequestSpec.user_ids`), its length is known only then.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "the of and to in is was for that on as with by he at from his it an were are which this be "
    "also or had first one their its new after who they two her she been other when there all during "
    "into school time may years more most only over city some world would where later up such used "
    "many can state about national out known university united then made government year against "
    "people part each series team war family between under river music century system game number "
    "three company since north well both second south group early high water house history language "
    "because during public small around before through market light power order story science field "
    "morning garden window letter bridge station village mountain island forest animal answer "
    "question reason simple paper voice result money energy design travel winter summer doctor "
    "teacher student market country report network engine memory signal planet kitchen picture"
).split()


@dataclass(frozen=True, slots=True)
class LengthMix:
    """Log-normal lengths clipped to [lo, hi]; `median` is the log-normal's median."""

    prompt_median: float
    prompt_sigma: float
    prompt_lo: int
    prompt_hi: int
    output_median: float
    output_sigma: float
    output_lo: int
    output_hi: int


SHARED_PREFIX = dict(system=768, question=(32, 0.5, 16, 64), output=(32, 0.5, 16, 64))
MULTITURN = dict(system=256, turns=(2, 6), user=(48, 0.6, 16, 128), output=(40, 0.5, 16, 96), think_s=2.0)
MEAN_TURNS = (MULTITURN["turns"][0] + MULTITURN["turns"][1]) / 2

MIXES: dict[str, LengthMix] = {
    "chat": LengthMix(160, 0.55, 64, 384, 48, 0.7, 16, 128),
    "code": LengthMix(96, 0.45, 32, 192, 96, 0.4, 48, 192),
    "summarize": LengthMix(700, 0.3, 384, 1024, 20, 0.45, 8, 48),
}
WORKLOADS = (*MIXES, "shared-prefix", "multiturn", "rewrite", "jsonl:PATH")


@dataclass(slots=True)
class RequestSpec:
    index: int  # position in the list (also the request's id suffix)
    prompt_ids: list[int] | None  # exact token ids (None for a JSONL prompt sent as text)
    prompt_text: str  # the same prompt as text
    prompt_len: int  # tokens in the prompt (as tokenized here)
    output_len: int  # tokens asked for (max_tokens; exactly this many with ignore_eos)
    ignore_eos: bool = True  # False: the answer ends at the model's end of turn, output_len at most (rewrite)
    arrival_s: float = 0.0  # offset from the run's start (open loop only; of its conversation's start for a turn)
    conversation: int = -1  # multiturn: the conversation it belongs to (-1: a lone request)
    turn: int = 0  # multiturn: its turn in the conversation (0 first)
    user_ids: list[int] | None = None  # multiturn, later turns: the new user message (prompt_ids built at send time)
    reply_ids: list[int] | None = None  # multiturn: the answer the history carries when the server gave none (a failed turn)
    think_s: float = 0.0  # multiturn: pause after the previous turn's answer before this turn is sent


def _clipped_lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(math.exp(rng.gauss(math.log(median), sigma))))))


def synthetic_ids(tokenizer, n: int, rng: random.Random) -> list[int]:
    """Exactly `n` token ids of random real words (no special tokens)."""
    ids: list[int] = []
    words = max(8, n)
    while len(ids) < n:
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        words *= 2
    return ids[:n]


def lengths(workload: str, n: int, seed: int) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) for `n` requests of a named mix."""
    mix = MIXES[workload]
    rng = random.Random(f"{workload}:{seed}")
    return [
        (_clipped_lognormal(rng, mix.prompt_median, mix.prompt_sigma, mix.prompt_lo, mix.prompt_hi),
         _clipped_lognormal(rng, mix.output_median, mix.output_sigma, mix.output_lo, mix.output_hi))
        for _ in range(n)
    ]


def build_requests(workload: str, n: int, tokenizer, seed: int = 0, variant: int = 0) -> list[RequestSpec]:
    """The request list (no arrival times yet): identical for identical (workload, n, seed, tokenizer).
    `variant` (chat, code, summarize, shared-prefix, multiturn): other words of the same lengths, so runs at several rates
    against one server do not find each other's prompts in its prefix cache (variant 0: the words
    runs before variants had)."""
    if workload.startswith("jsonl:"):
        return _from_jsonl(Path(workload[len("jsonl:"):]), n, tokenizer)
    if workload == "shared-prefix":
        return _shared_prefix(n, tokenizer, seed, variant)
    if workload == "multiturn":
        return _multiturn(n, tokenizer, seed, variant)
    if workload == "rewrite":
        return rewrite_requests(n, tokenizer, seed)
    if workload not in MIXES:
        raise ValueError(f"unknown workload {workload!r}: use one of {', '.join(WORKLOADS)}")
    rng = random.Random(f"prompts:{workload}:{seed}" + (f":{variant}" if variant else ""))
    out = []
    for i, (p, o) in enumerate(lengths(workload, n, seed)):
        ids = synthetic_ids(tokenizer, p, rng)
        out.append(RequestSpec(i, ids, tokenizer.decode(ids), p, o))
    return out


def _shared_prefix(n: int, tokenizer, seed: int, variant: int = 0) -> list[RequestSpec]:
    rng = random.Random(f"shared-prefix:{seed}")  # lengths
    words = random.Random(f"shared-prefix:{seed}:{variant}")
    system = synthetic_ids(tokenizer, SHARED_PREFIX["system"], words)
    out = []
    for i in range(n):
        q = synthetic_ids(tokenizer, _clipped_lognormal(rng, *SHARED_PREFIX["question"]), words)
        ids = system + q
        out.append(RequestSpec(i, ids, tokenizer.decode(ids), len(ids), _clipped_lognormal(rng, *SHARED_PREFIX["output"])))
    return out


def _multiturn(n: int, tokenizer, seed: int, variant: int = 0) -> list[RequestSpec]:
    """`n` turns in all, conversation after conversation (the last one cut short to fit)."""
    rng = random.Random(f"multiturn:{seed}")  # lengths, turns, think times
    words = random.Random(f"multiturn:{seed}:{variant}")
    system = synthetic_ids(tokenizer, MULTITURN["system"], words)
    out: list[RequestSpec] = []
    conv = 0
    while len(out) < n:
        turns = min(rng.randint(*MULTITURN["turns"]), n - len(out))
        for t in range(turns):
            user = synthetic_ids(tokenizer, _clipped_lognormal(rng, *MULTITURN["user"]), words)
            out_len = _clipped_lognormal(rng, *MULTITURN["output"])
            reply = synthetic_ids(tokenizer, out_len, words)
            think = rng.expovariate(1.0 / MULTITURN["think_s"]) if t else 0.0
            if t == 0:
                ids = system + user
                spec = RequestSpec(len(out), ids, tokenizer.decode(ids), len(ids), out_len)
            else:
                spec = RequestSpec(len(out), None, "", 0, out_len, user_ids=user)
            spec.conversation, spec.turn, spec.reply_ids, spec.think_s = conv, t, reply, think
            out.append(spec)
        conv += 1
    return out


def conversations(reqs: list[RequestSpec]) -> list[list[RequestSpec]]:
    """The request list as conversations (a lone request is a conversation of one), in order of first index."""
    groups: dict[int, list[RequestSpec]] = {}
    for r in reqs:
        groups.setdefault(r.conversation if r.conversation >= 0 else -1 - r.index, []).append(r)
    return sorted((sorted(g, key=lambda r: r.turn) for g in groups.values()), key=lambda g: g[0].index)


# -- rewrite: outputs that draw on the prompt, from the standard library's source ----------------

REWRITE_CODE = "Rewrite this Python function with type hints on every parameter and on the return value. Keep the body as it is.\n\n```python\n{src}\n```"
REWRITE_DOC = "Rewrite this documentation of `{name}` as a bulleted list, keeping its wording.\n\n{doc}"
REWRITE_CHARS = (200, 1400)  # function sources and docstrings of this many characters


@functools.lru_cache(maxsize=1)
def stdlib_texts() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(name, source) of unannotated functions and (name, docstring) of documented ones from the
    standard library's top-level modules, in a fixed order (sorted files, source order)."""
    import ast
    import sysconfig
    import textwrap

    lib = Path(sysconfig.get_paths()["stdlib"])
    funcs, docs = [], []
    lo, hi = REWRITE_CHARS
    for path in sorted(lib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = None
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("__"):
                continue
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
            name = f"{path.stem}.{node.name}"
            doc = ast.get_docstring(node)
            if doc and lo <= len(doc) <= hi:
                docs.append((name, doc))
            if node.returns is None and params and all(p.annotation is None for p in params):
                if lines is None:
                    lines = text.splitlines(keepends=True)
                src = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno])).rstrip()
                if lo <= len(src) <= hi and "\t" not in src:
                    funcs.append((name, src))
    return funcs, docs


def chat_prompt(tokenizer, text: str) -> list[int]:
    """The model's chat template around one user message (the text as is without a template)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def rewrite_requests(n: int, tokenizer, seed: int = 0) -> list[RequestSpec]:
    funcs, docs = stdlib_texts()
    rng = random.Random(f"rewrite:{seed}")
    funcs = rng.sample(funcs, min(len(funcs), n))
    docs = rng.sample(docs, min(len(docs), n))
    out = []
    for i in range(n):
        if i % 3 != 2 and funcs:
            _, src = funcs[(i - i // 3) % len(funcs)]
            text, body = REWRITE_CODE.format(src=src), src
        else:
            name, doc = docs[(i // 3) % len(docs)]
            text, body = REWRITE_DOC.format(name=name, doc=doc), doc
        ids = chat_prompt(tokenizer, text)
        body_tokens = len(tokenizer(body, add_special_tokens=False)["input_ids"])
        out.append(RequestSpec(i, ids, tokenizer.decode(ids), len(ids), int(min(256, max(32, body_tokens * 1.1 + 16))), ignore_eos=False))
    return out


def _from_jsonl(path: Path, n: int, tokenizer) -> list[RequestSpec]:
    out = []
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            text, out_len = str(row["prompt"]), int(row["output_len"])
            if not text or out_len < 1:
                raise ValueError(f"{path}: each line needs a non-empty prompt and output_len >= 1, got {row}")
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            out.append(RequestSpec(len(out), ids, text, len(ids), out_len))
            if len(out) == n:
                break
    if not out:
        raise ValueError(f"{path} holds no requests")
    while len(out) < n:  # cycle a short file
        src = out[len(out) % len(out)]
        out.append(RequestSpec(len(out), src.prompt_ids, src.prompt_text, src.prompt_len, src.output_len))
    return out


# -- arrivals ----------------------------------------------------------------------------------


def arrival_times(n: int, rate: float, process: str = "poisson", cv: float = 1.0, seed: int = 0) -> list[float]:
    """Offsets (seconds) of `n` arrivals at `rate` req/s: Poisson, or gamma with coefficient of variation `cv`.

    Gamma inter-arrival times with shape k = 1/cv^2 and scale 1/(rate k) have mean 1/rate and
    standard deviation cv/rate; cv = 1 is Poisson, cv > 1 burstier. The first request goes at 0.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = random.Random(f"arrivals:{seed}")
    if process == "poisson":
        cv = 1.0
    elif process != "gamma":
        raise ValueError(f"arrival process must be poisson or gamma, got {process!r}")
    if cv <= 0:
        raise ValueError(f"cv must be > 0, got {cv}")
    shape = 1.0 / (cv * cv)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(shape, 1.0 / (rate * shape))
    return out


def with_arrivals(reqs: list[RequestSpec], rate: float, process: str = "poisson", cv: float = 1.0, seed: int = 0) -> list[RequestSpec]:
    """Arrival times for a request list; a conversation's turns all get its start time (the first
    turn goes then, the others after the answers and think times before them)."""
    if any(r.conversation >= 0 for r in reqs):
        convs = conversations(reqs)
        starts = arrival_times(len(convs), rate * len(convs) / len(reqs), process, cv, seed)
        start_of = {id(r): t for g, t in zip(convs, starts) for r in g}
        return [dataclasses.replace(r, arrival_s=start_of[id(r)]) for r in reqs]
    return [dataclasses.replace(r, arrival_s=t) for r, t in zip(reqs, arrival_times(len(reqs), rate, process, cv, seed))]
