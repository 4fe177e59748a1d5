"""The `distserve` command: up, serve, generate, bench, model pull."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from distserve import config


def _run_async(coro) -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)


def cmd_serve(args) -> None:
    if args.service == "router":
        from services.router.main import RouterSettings, run

        _run_async(run(config.from_args(RouterSettings, args)))
        return
    from distserve.runtime import WorkerSettings

    settings = config.from_args(WorkerSettings, args, role=args.service)
    if args.service == "prefill":
        from services.prefill.main import run
    else:
        from services.decode.main import run
    _run_async(run(settings))


def cmd_up(args) -> None:
    from distserve.up import Suite

    raise SystemExit(Suite(args).run())


def cmd_generate(args) -> None:
    from distserve.client import Client

    with Client(args.target, timeout_s=args.timeout) as c:
        kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed, stop=args.stop or None, ignore_eos=args.ignore_eos, chat=not args.raw)
        if args.json:
            print(json.dumps(c.generate(args.prompt, **kw).to_dict()))
            return
        for chunk in c.stream(args.prompt, **kw):
            print(chunk.text, end="", flush=True)
        print()


def cmd_bench(args) -> None:
    if args.what == "engine":
        from distserve.bench.engine_bench import run

        result = run(model=args.model, batch=args.batch, context=args.context, steps=args.steps, threads=args.threads or None)
        print(json.dumps(result) if args.json else "\n".join(f"{k:>20}: {v}" for k, v in result.items()))
    elif args.what == "latency":
        from distserve.bench.latency import main

        main(args)


def cmd_model(args) -> None:
    from distserve.engine.models import resolve_model_dir

    print(resolve_model_dir(args.name) or "(built in-process)")


def build_parser() -> argparse.ArgumentParser:
    from distserve.runtime import WorkerSettings
    from services.router.main import RouterSettings

    p = argparse.ArgumentParser(prog="distserve", description="Disaggregated prefill/decode LLM serving")
    p.add_argument("--log-level", default="info")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run the whole suite on this machine (Redis, router, workers)")
    up.add_argument("--model", default="smollm2-135m")
    up.add_argument("--prefill", type=int, default=1, help="prefill workers")
    up.add_argument("--decode", type=int, default=1, help="decode workers")
    up.add_argument("--colocated", type=int, default=0, help="colocated workers (both phases); with no prefill workers the router uses them alone")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=50051, help="router port")
    up.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = divide the cores)")
    up.add_argument("--no-pin", action="store_true", help="do not pin workers to cores")
    up.add_argument("--worker-arg", action="append", default=[], help="extra flag passed to every worker, e.g. --worker-arg=--kv-cache-bytes=268435456")
    up.add_argument("--logs", default="", help="folder for the processes' logs (default: a new folder under $DISTSERVE_HOME/logs)")
    up.set_defaults(fn=cmd_up)

    serve = sub.add_parser("serve", help="run one service (for containers)")
    ssub = serve.add_subparsers(dest="service", required=True)
    r = ssub.add_parser("router", help="the public Generation API")
    config.add_arguments(r, RouterSettings)
    for role in ("prefill", "decode", "colocated"):
        w = ssub.add_parser(role, help=f"a {role} worker")
        config.add_arguments(w, WorkerSettings)
    serve.set_defaults(fn=cmd_serve)

    g = sub.add_parser("generate", help="send one prompt to a router")
    g.add_argument("prompt")
    g.add_argument("--target", default="localhost:50051")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the model's chat template")
    g.add_argument("--timeout", type=float, default=600.0)
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=cmd_generate)

    b = sub.add_parser("bench", help="benchmarks that print figures")
    bsub = b.add_subparsers(dest="what", required=True)
    be = bsub.add_parser("engine", help="engine vs plain transformers, same run")
    be.add_argument("--model", default="smollm2-135m")
    be.add_argument("--batch", type=int, default=16)
    be.add_argument("--context", type=int, default=256)
    be.add_argument("--steps", type=int, default=32)
    be.add_argument("--threads", type=int, default=0)
    be.add_argument("--json", action="store_true")
    bl = bsub.add_parser("latency", help="per-phase latency breakdown and router overhead on a running suite")
    bl.add_argument("--target", default="localhost:50051")
    bl.add_argument("--redis-url", default="")
    bl.add_argument("--num-requests", type=int, default=16)
    bl.add_argument("--prompt-len", type=int, default=256)
    bl.add_argument("--max-tokens", type=int, default=32)
    bl.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_bench)

    m = sub.add_parser("model", help="model cache")
    msub = m.add_subparsers(dest="action", required=True)
    pull = msub.add_parser("pull", help="fetch and convert a model into the cache")
    pull.add_argument("name", nargs="?", default="smollm2-135m")
    m.set_defaults(fn=cmd_model)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _logging(args.log_level)
    args.fn(args)


if __name__ == "__main__":
    main(sys.argv[1:])
