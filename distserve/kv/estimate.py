"""What a KV pull costs, as recent pulls measured it: bandwidth and wire bytes per prompt token.

A decode worker feeds its `PullEstimate` with every pull it makes (bytes on the wire, seconds, prompt
tokens) and publishes it in its registry load; a router keeps one per (prefill, decode) pair from the
pulls its requests report, so the transfer cost of a pair is what that pair's transport moved lately
(shm on one host, gloo or gRPC across). `seconds(tokens)` predicts a pull of a prompt.

Bandwidth is each pull's bytes over its whole time, averaged with exponential weights: a pull's fixed
cost (connect, RPC round trips) is inside it, so small pulls show less bandwidth, as they get.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.2  # weight of the newest pull


@dataclass(slots=True)
class PullEstimate:
    bytes_per_s: float = 0.0  # recent bandwidth of whole pulls (0 = none measured)
    bytes_per_token: float = 0.0  # recent wire bytes per prompt token
    pulls: int = 0

    def observe(self, nbytes: int, seconds: float, tokens: int) -> None:
        if nbytes <= 0 or tokens <= 0 or not seconds > 0 or not math.isfinite(seconds):
            return
        bw, per_token = nbytes / seconds, nbytes / tokens
        if self.pulls == 0:
            self.bytes_per_s, self.bytes_per_token = bw, per_token
        else:
            self.bytes_per_s += ALPHA * (bw - self.bytes_per_s)
            self.bytes_per_token += ALPHA * (per_token - self.bytes_per_token)
        self.pulls += 1

    @property
    def known(self) -> bool:
        return self.bytes_per_s > 0 and self.bytes_per_token > 0

    def seconds(self, tokens: int) -> float | None:
        """Predicted time to pull a prompt's KV; None before any pull."""
        return tokens * self.bytes_per_token / self.bytes_per_s if self.known else None
