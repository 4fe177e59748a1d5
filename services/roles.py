"""The services a process can run, by name: `distserve serve ROLE` and `distserve up`'s forked workers
both start one through here.

A role's settings class is light (`services.router.settings.RouterSettings`,
`distserve.runtime.WorkerSettings`: no torch), so the CLI parses flags without loading anything; the
role's `run` coroutine (and with it torch and the engine, for workers) is imported only when that
role starts. `main(["serve", ROLE, *flags])` is the whole of what a forked worker runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from distserve import config

ROLES = ("router", "prefill", "decode", "colocated")


def settings_class(role: str) -> type:
    if role == "router":
        from services.router.settings import RouterSettings

        return RouterSettings
    from distserve.runtime import WorkerSettings

    return WorkerSettings


def settings_from(role: str, args: argparse.Namespace):
    """The role's validated settings from parsed flags (`config.add_arguments`), env and defaults."""
    cls = settings_class(role)
    return config.from_args(cls, args) if role == "router" else config.from_args(cls, args, role=role)


async def run(role: str, settings) -> None:
    """Serves `role` in this process until a stop signal (SIGTERM/SIGINT) ends it in order."""
    if role == "router":
        from services.router.main import run as serve
    elif settings.elastic:
        from services.elastic.main import run as serve
    elif role == "prefill":
        from services.prefill.main import run as serve
    else:
        from services.decode.main import run as serve
    await serve(settings)


def serve(role: str, settings) -> None:
    """`run` on a uvloop event loop."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(role, settings))


def main(argv: list[str]) -> None:
    """`serve ROLE [flags]`, as `distserve` takes it (the log level from $DISTSERVE_LOG_LEVEL)."""
    if len(argv) < 2 or argv[0] != "serve" or argv[1] not in ROLES:
        raise SystemExit(f"expected `serve {{{','.join(ROLES)}}} [flags]`, got {argv[:2]}")
    role = argv[1]
    parser = argparse.ArgumentParser(prog=f"distserve serve {role}")
    config.add_arguments(parser, settings_class(role))
    args = parser.parse_args(argv[2:])
    config.setup_logging(os.environ.get("DISTSERVE_LOG_LEVEL", "info"))
    serve(role, settings_from(role, args))
