"""The `distserve` command: up, serve, generate, bench, profile, plan, kernels, model pull, health, certs, role, settings.

The composition root: the one library module that names the services (`serve`, `up` and the settings
tables reach them through `services.roles`, `services.up` and their settings modules). Building the
parser imports only light modules (no torch, no engine, no gRPC server code), and each command
imports what it runs when it runs, so a client command (`generate`, `health`, `certs`, `bench serve`)
and a router never load torch (tests/unit/test_light_imports.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from distserve import config


def cmd_serve(args) -> None:
    from services import roles

    roles.serve(args.service, roles.settings_from(args.service, args))


def cmd_role(args) -> None:
    """Asks a worker to serve another role (an elastic worker drains and changes within a heartbeat)."""
    from distserve.errors import DistserveError
    from distserve.state.connect import connect
    from distserve.state.registry import Registry

    async def ask() -> bool:
        r = connect(args.redis_url, role="router")
        try:
            return await Registry(r).request_role(args.worker_id, args.role)
        finally:
            await r.aclose()

    try:
        ok = asyncio.run(ask())
    except DistserveError as exc:
        raise SystemExit(str(exc))
    if not ok:
        raise SystemExit(f"no worker {args.worker_id!r} is registered")
    print(f"asked {args.worker_id} to serve {args.role}")


def cmd_up(args) -> None:
    from services.up import Suite

    raise SystemExit(Suite(args).run())


def cmd_generate(args) -> None:
    from distserve.client import Client

    with Client(args.target, timeout_s=args.timeout, api_key=args.api_key or None, **tls_kwargs(args)) as c:
        kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed, stop=args.stop or None, ignore_eos=args.ignore_eos, chat=not args.raw)
        if args.json:
            print(json.dumps(c.generate(args.prompt, **kw).to_dict()))
            return
        for chunk in c.stream(args.prompt, **kw):
            print(chunk.text, end="", flush=True)
        print()


def cmd_bench(args) -> None:
    if args.what == "engine" and args.speculative != "none":
        from distserve.bench.spec_bench import run

        result = run(model=args.model, speculative=args.speculative, batches=tuple(int(b) for b in args.spec_batches.split(",")),
                     prompts=args.prompts, batch1_prompts=args.batch1_prompts, threads=args.threads or None,
                     weights=args.weights, kv_dtype=args.kv_dtype, draft_model=args.draft_model, draft_layers=args.draft_layers,
                     adaptive=not args.fixed_k, workloads=tuple(args.workloads.split(",")), ignore_eos=args.ignore_eos)
        print(json.dumps(result) if args.json else "\n".join(f"{k:>20}: {v}" for k, v in result.items()))
    elif args.what == "engine":
        from distserve.bench.engine_bench import run

        result = run(model=args.model, batch=args.batch, context=args.context, steps=args.steps, threads=args.threads or None,
                     weights=args.weights, kv_dtype=args.kv_dtype)
        print(json.dumps(result) if args.json else "\n".join(f"{k:>20}: {v}" for k, v in result.items()))
    elif args.what == "latency":
        from distserve.bench.latency import main

        main(args)
    elif args.what == "kv":
        from distserve.bench.kv_bench import run, table

        result = run(sizes_mb=[int(x) for x in args.sizes_mb.split(",")], prompts=[int(x) for x in args.prompts.split(",") if x],
                     reps=args.reps, model=args.model, transports=tuple(args.transports.split(",")), agreement=not args.no_agreement,
                     tls=args.tls)
        print(json.dumps(result) if args.json else table(result))
    elif args.what == "serve":
        from distserve.bench.serve import main

        main(args)
    elif args.what == "goodput":
        from distserve.bench.goodput import main

        main(args)


def cmd_profile(args) -> None:
    from distserve.planner.commands import profile_main

    profile_main(args)


def cmd_plan(args) -> None:
    from distserve.planner.commands import plan_main

    plan_main(args)


def cmd_kernels(args) -> None:
    from distserve.engine.kernels.commands import kernels_main

    kernels_main(args)


def cmd_model(args) -> None:
    from distserve.models import resolve_model_dir

    print(resolve_model_dir(args.name) or "(built in-process)")


def cmd_health(args) -> None:
    """gRPC health check (grpc.health.v1) for container probes: exit 0 when SERVING, else 1. With TLS
    files, the service's certificate is checked as `distserve.internal` (every distserve certificate
    names it), so a probe may dial a pod's IP."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from distserve.rpc.channels import internal_options, sync_channel
    from distserve.rpc.tls import Tls

    tls = Tls.load(args.tls_ca, args.tls_cert, args.tls_key)
    with sync_channel(args.target, tls, internal_options(tls)) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.RpcError as exc:
            status = exc.code().name
    print(f"{args.target} {args.service or '(server)'}: {status}")
    raise SystemExit(0 if status == "SERVING" else 1)


def cmd_certs(args) -> None:
    from distserve.rpc.certs import ROLES, make_certs, valid_for

    if args.keep and valid_for(args.out, args.host):
        print(f"kept the certificates in {args.out}: a whole set, valid for every --host")
        return
    out = make_certs(args.out, args.host, days=args.days)
    print(f"wrote a CA and certificates for {', '.join(ROLES)} to {out} (keys 0600); "
          f"serve each role with DISTSERVE_TLS_CA={out}/ca.pem DISTSERVE_TLS_CERT={out}/<role>.pem "
          f"DISTSERVE_TLS_KEY={out}/<role>-key.pem; clients need only DISTSERVE_TLS_CA. Keep ca-key.pem off the serving hosts.")


def add_tls_arguments(parser: argparse.ArgumentParser, what: str = "the router") -> None:
    """--tls-ca/--tls-cert/--tls-key, defaulting to $DISTSERVE_TLS_CA/_CERT/_KEY."""
    env = os.environ.get
    parser.add_argument("--tls-ca", default=env("DISTSERVE_TLS_CA", ""), help=f"CA file that {what}'s certificate chains to: turns TLS on [env DISTSERVE_TLS_CA]")
    parser.add_argument("--tls-cert", default=env("DISTSERVE_TLS_CERT", ""), help="client certificate, where one is asked for [env DISTSERVE_TLS_CERT]")
    parser.add_argument("--tls-key", default=env("DISTSERVE_TLS_KEY", ""), help="its private key [env DISTSERVE_TLS_KEY]")


def tls_kwargs(args) -> dict:
    """The Client's TLS arguments from add_tls_arguments' flags."""
    return {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}


SETTINGS_DOC_HEAD = """# Configuration

Generated by `distserve settings > docs/configuration.md` from the settings dataclasses; a test checks
that this file equals the generated text, so it always agrees with `distserve serve ... --help`.

Every setting is a flag and a `DISTSERVE_*` environment variable; a flag wins over the variable, which
wins over the default. Values are checked when the service starts: a bad one stops it with a message
that names the setting. Booleans accept 1/0, true/false, yes/no, on/off. `DISTSERVE_LOG_LEVEL` (or
`--log-level` before the command) sets the log level of every command; `DISTSERVE_HOME` is where
models are cached (default `~/.cache/distserve`).
"""


def settings_doc() -> str:
    from distserve.runtime import WorkerSettings
    from services.router.settings import RouterSettings

    return "\n".join([
        SETTINGS_DOC_HEAD,
        "## Router: `distserve serve router`\n",
        config.settings_table(RouterSettings),
        "",
        "## Workers: `distserve serve prefill`, `serve decode`, `serve colocated`\n",
        "`--role` is set by the command and need not be given.\n",
        config.settings_table(WorkerSettings),
        "",
    ])


def cmd_settings(args) -> None:
    print(settings_doc(), end="")


def build_parser() -> argparse.ArgumentParser:
    from distserve.runtime import WorkerSettings
    from services.router.settings import RouterSettings

    p = argparse.ArgumentParser(prog="distserve", description="Disaggregated prefill/decode LLM serving")
    p.add_argument("--log-level", default=os.environ.get("DISTSERVE_LOG_LEVEL", "info"), help="[env DISTSERVE_LOG_LEVEL; default 'info']")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run the whole suite on this machine (Redis, router, workers)")
    up.add_argument("--model", default="smollm2-135m")
    up.add_argument("--prefill", type=int, default=1, help="prefill workers")
    up.add_argument("--decode", type=int, default=1, help="decode workers")
    up.add_argument("--colocated", type=int, default=0, help="colocated workers (both phases); with no prefill workers the router uses them alone")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=50051, help="router port (further routers: the next free ports up)")
    up.add_argument("--http-port", type=int, default=8000,
                    help="OpenAI-compatible HTTP API of the first router (-1 = off; further routers: the next ports up)")
    up.add_argument("--routers", type=int, default=1, help="routers, each serving the whole suite (clients may be given all of them)")
    up.add_argument("--restart-limit", type=int, default=5,
                    help="restarts in a row of one crashed process (worker, router or Redis; backoff 0.5 s doubling to 30 s) "
                         "before it is left down; a process that stayed up 60 s starts its count afresh; 0 = never restart. "
                         "up exits (code 1) once no router is left")
    up.add_argument("--threads", type=int, default=0, help="torch threads per worker (0 = divide the cores)")
    up.add_argument("--no-pin", action="store_true", help="do not pin workers to cores")
    up.add_argument("--elastic", action="store_true",
                    help="prefill and decode workers serve both roles and change role when asked (distserve role set, or "
                         "distserve plan --watch --apply); each gets the decode role's certificate and Redis user, which both roles' work needs")
    up.add_argument("--worker-arg", action="append", default=[], help="extra flag passed to every worker, e.g. --worker-arg=--kv-cache-bytes=268435456")
    up.add_argument("--router-arg", action="append", default=[], help="extra flag passed to every router, e.g. --router-arg=--migration-limit=3")
    up.add_argument("--logs", default="", help="folder for the processes' logs (default: a new folder under $DISTSERVE_HOME/logs)")
    up.add_argument("--weights", default="", choices=("", "auto", "fp32", "int8"), help="every worker's --weights (default: theirs, auto)")
    up.add_argument("--kv-dtype", default="", choices=("", "auto", "int8"), help="every worker's --kv-dtype (default: theirs, auto)")
    up.add_argument("--speculative", default="", choices=("", "none", "ngram", "draft"), help="decode and colocated workers' --speculative (default: theirs, none; a --draft-model goes through --worker-arg)")
    up.add_argument("--share-weights", default="", choices=("", "auto", "on", "off"), help="every worker's --share-weights (default: theirs, auto)")
    up.add_argument("--prefill-gemm", default="", choices=("", "auto", "native", "fp32", "bf16"), help="every worker's --prefill-gemm (default: theirs, auto)")
    up.add_argument("--tls", default="on", choices=("on", "off"),
                    help="on: mutual TLS between the services and TLS (HTTPS) to the router, with certificates made once in --tls-dir; "
                         "clients then need DISTSERVE_TLS_CA=<tls-dir>/ca.pem. off: plaintext")
    up.add_argument("--tls-dir", default="", help="the CA and role certificates (default: $DISTSERVE_HOME/tls; made when missing, "
                                                  "stale or lacking a host)")
    up.add_argument("--preload", default="on", choices=("on", "off"),
                    help="on: fork the workers from this process after importing torch and the engine once, so they share those pages; off: spawn each as a fresh interpreter")
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
    g.add_argument("--target", default="localhost:50051", help="router address; several, comma-separated, to fail over between them")
    g.add_argument("--api-key", default="", help="the router's API key (default: $DISTSERVE_API_KEY)")
    add_tls_arguments(g)
    g.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (this command's default; the API's is 16)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (this command's default; the API's is 1)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus mass kept (default: the server's, no cut)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: the server's, no cut)")
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
    be.add_argument("--steps", type=int, default=48)
    be.add_argument("--threads", type=int, default=0)
    be.add_argument("--weights", default="fp32", choices=("fp32", "int8"), help="int8 also prints its speed against fp32 and the quality figures")
    be.add_argument("--kv-dtype", default="auto", choices=("auto", "int8"), help="int8 also prints the quality figures against fp32 KV")
    be.add_argument("--speculative", default="none", choices=("none", "ngram", "draft"),
                    help="ngram or draft: TPOT with speculative decoding against without, on the rewrite and chat workloads (distserve.bench.spec_bench)")
    be.add_argument("--draft-model", default="", help="with --speculative draft: the draft model (default: a self-draft)")
    be.add_argument("--draft-layers", type=int, default=0, help="with --speculative draft and no --draft-model: the self-draft's layers (0 = a quarter)")
    be.add_argument("--fixed-k", action="store_true", help="with --speculative: verify every draft up to k (no adaptive k), to measure the drafts' own acceptance")
    be.add_argument("--workloads", default="rewrite,chat", help="with --speculative: workloads, comma-separated")
    be.add_argument("--ignore-eos", action="store_true", help="with --speculative: every request to its full output length (rewrite's answers otherwise end at the model's end of turn)")
    be.add_argument("--spec-batches", default="1,8", help="with --speculative: batch sizes, comma-separated")
    be.add_argument("--prompts", type=int, default=56, help="with --speculative: requests per workload at batch > 1")
    be.add_argument("--batch1-prompts", type=int, default=8, help="with --speculative: requests per workload at batch 1")
    be.add_argument("--json", action="store_true")
    bl = bsub.add_parser("latency", help="per-phase latency breakdown and router overhead on a running suite")
    bl.add_argument("--target", default="", help="a running router (default: start a suite with distserve up)")
    bl.add_argument("--redis-url", default="", help="its Redis (needed with --target)")
    bl.add_argument("--http-url", default="", help="its OpenAI API, e.g. http://127.0.0.1:8000: also measure what HTTP adds over gRPC")
    bl.add_argument("--tls", default="on", choices=("on", "off"), help="TLS of the suite it starts itself (without --target)")
    add_tls_arguments(bl)  # against a TLS suite: a router's certificate (the direct Prefill calls need that role)
    bl.add_argument("--model", default="smollm2-135m")
    bl.add_argument("--pairs", type=int, default=50, help="router/direct pairs for the overhead figure")
    bl.add_argument("--num-requests", type=int, default=16, help="concurrent requests in the breakdown batch")
    bl.add_argument("--prompt-len", type=int, default=256)
    bl.add_argument("--max-tokens", type=int, default=32)
    bl.add_argument("--json", action="store_true")
    bk = bsub.add_parser("kv", help="KV transports (grpc, gloo, shm, mooncake) vs memcpy, raw socket and raw gloo; fp16/int8 wire agreement")
    bk.add_argument("--sizes-mb", default="1,4,16,64,256", help="synthetic payloads, MiB")
    bk.add_argument("--prompts", default="128,512,2048", help="prompt lengths whose real KV is moved")
    bk.add_argument("--reps", type=int, default=5)
    bk.add_argument("--model", default="smollm2-135m")
    bk.add_argument("--transports", default="grpc,gloo,shm", help="mooncake is added when its wheel imports")
    bk.add_argument("--no-agreement", action="store_true", help="skip the fp16/int8 greedy-agreement run")
    bk.add_argument("--tls", action="store_true", help="mutual TLS on the control plane, as a suite with TLS runs it (the grpc transport's bytes go through it)")
    bk.add_argument("--json", action="store_true")
    from distserve.bench.goodput import add_goodput_arguments
    from distserve.bench.serve import add_serve_arguments

    add_serve_arguments(bsub.add_parser("serve", help="one load run (Poisson/gamma/closed loop) against distserve:// or openai:// with SLO attainment"))
    add_goodput_arguments(bsub.add_parser("goodput", help="highest rate with >= 90% SLO attainment, and the SLO scale at a fixed rate"))
    b.set_defaults(fn=cmd_bench)

    from distserve.planner.commands import add_plan_arguments, add_profile_arguments

    add_profile_arguments(sub.add_parser("profile", help="measure the engine on this machine and fit the planner's latency model")).set_defaults(fn=cmd_profile)
    add_plan_arguments(sub.add_parser("plan", help="placements by simulated goodput; `plan simulate` replays a trace, `plan reference` the DistServe A100 runs; --watch, --validate")).set_defaults(fn=cmd_plan)

    from distserve.engine.kernels.commands import add_kernels_arguments

    add_kernels_arguments(sub.add_parser("kernels", help="native kernels: `build` them ahead of time per CPU class, `status` of what is built and chosen")).set_defaults(fn=cmd_kernels)

    m = sub.add_parser("model", help="model cache")
    msub = m.add_subparsers(dest="action", required=True)
    pull = msub.add_parser("pull", help="fetch and convert a model into the cache")
    pull.add_argument("name", nargs="?", default="smollm2-135m")
    m.set_defaults(fn=cmd_model)

    h = sub.add_parser("health", help="gRPC health check of one service (exit 0 when SERVING), for container probes")
    h.add_argument("--target", default="localhost:50051")
    h.add_argument("--service", default="", help="service name to check (default: the whole server)")
    h.add_argument("--timeout", type=float, default=3.0)
    add_tls_arguments(h, "the service")
    h.set_defaults(fn=cmd_health)

    c = sub.add_parser("certs", help="make a development CA and a certificate per role (router, prefill, decode, colocated, client)")
    c.add_argument("--out", default="tls", help="folder to write them to (made 0700)")
    c.add_argument("--host", action="append", default=[],
                   help="a DNS name or IP address clients use to reach the services, besides localhost/127.0.0.1/::1 (repeat)")
    c.add_argument("--days", type=int, default=365, help="validity")
    c.add_argument("--keep", action="store_true",
                   help="leave --out alone when it already holds a whole set, signed by its CA, naming every --host and "
                        "not within a day of its end (for a container that runs it at every start); else make a new one")
    c.set_defaults(fn=cmd_certs)

    ro = sub.add_parser("role", help="change a worker's role: `role set WORKER_ID prefill|decode` (elastic workers)")
    rosub = ro.add_subparsers(dest="action", required=True)
    rs = rosub.add_parser("set", help="ask a worker started with --elastic to drain and serve another role")
    rs.add_argument("worker_id")
    rs.add_argument("role", choices=("prefill", "decode"))
    rs.add_argument("--redis-url", default=os.environ.get("DISTSERVE_REDIS_URL", "redis://127.0.0.1:6379/0"),
                    help="Redis of the registry, with a user that may write worker entries (router or admin) [env DISTSERVE_REDIS_URL]")
    ro.set_defaults(fn=cmd_role)

    st = sub.add_parser("settings", help="print the table of every service setting (docs/configuration.md)")
    st.set_defaults(fn=cmd_settings)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config.setup_logging(args.log_level)
    args.fn(args)


if __name__ == "__main__":
    main(sys.argv[1:])
