"""What gRPC itself can move on this machine, with no protobuf objects: the ceiling for the grpc KV
transport (`distserve.kv.grpc_transport`).

A holder process streams a warm 64 MiB buffer as raw byte messages of --chunk-kib (a generic
handler, no serialiser) and this process copies each message into a warm destination, like the
transport does; it prints GB/s per repetition. Compare with the grpc column of `distserve bench kv`.

    python benchmarks/grpc_ceiling.py [--chunk-kib 4096] [--reps 6] [--sync]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import time

import grpc
import torch

TOTAL = 64 << 20
OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def _serve(port: int, chunk: int, ready) -> None:
    import uvloop

    src = torch.randint(0, 255, (TOTAL,), dtype=torch.uint8)
    view = memoryview(src.numpy())

    async def pull(request, context):
        for offset in range(0, TOTAL, chunk):
            yield bytes(view[offset : offset + chunk])

    async def main():
        server = grpc.aio.server(options=OPTIONS)
        handler = grpc.method_handlers_generic_handler("ceiling.Bytes", {"Pull": grpc.unary_stream_rpc_method_handler(pull)})
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    uvloop.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunk-kib", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--sync", action="store_true", help="the blocking grpc API instead of grpc.aio")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = mp.Event()
    holder = mp.Process(target=_serve, args=(port, args.chunk_kib << 10, ready), daemon=True)
    holder.start()
    ready.wait(30)
    dst = torch.zeros(TOTAL, dtype=torch.uint8)  # warm
    view = memoryview(dst.numpy())
    target = f"127.0.0.1:{port}"
    label = f"{'sync' if args.sync else 'aio'}, {args.chunk_kib} KiB messages"

    def report(seconds: float) -> None:
        print(f"grpc ceiling ({label}): {TOTAL / seconds / 1e9:.2f} GB/s")

    try:
        if args.sync:
            pull = grpc.insecure_channel(target, options=OPTIONS).unary_stream("/ceiling.Bytes/Pull")
            for _ in range(args.reps + 1):
                t, n = time.perf_counter(), 0
                for message in pull(b""):
                    view[n : n + len(message)] = message
                    n += len(message)
                report(time.perf_counter() - t)
        else:
            async def run():
                pull = grpc.aio.insecure_channel(target, options=OPTIONS).unary_stream("/ceiling.Bytes/Pull")
                for _ in range(args.reps + 1):
                    t, n = time.perf_counter(), 0
                    async for message in pull(b""):
                        view[n : n + len(message)] = message
                        n += len(message)
                    report(time.perf_counter() - t)

            asyncio.run(run())
    finally:
        holder.terminate()


if __name__ == "__main__":
    main()
