"""FedOpt (Reddi et al. 2021): the server's optimizer over each version's pseudo-gradient.

A version's pseudo-gradient ``d`` is the buffer's mean delta (the fold at server learning rate 1).
``sgd`` takes ``x + eta d`` (FedAvg/FedBuff, the default); the others keep moments from version
to version:

- ``avgm``: ``m <- beta1 m + d``; ``x <- x + eta m`` (server momentum, FedAvgM);
- ``adam``: ``m <- beta1 m + (1 - beta1) d``; ``v <- beta2 v + (1 - beta2) d^2``;
  ``x <- x + eta m / (sqrt(v) + tau)``;
- ``yogi``: as adam, but ``v <- v - (1 - beta2) d^2 sign(v - d^2)``.

Moments start at m = 0 and v = tau^2 (the paper's v_{-1} >= tau^2), with no bias correction.
They are a version's state like its model: ``ServerState`` is stored beside each version (its
sha256 in the signed manifest), and a restarted or standby aggregator and ``fedq replay verify``
continue from the parent's. Only float tensors have moments; integer tensors step as in sgd.

Every operation is one IEEE-rounded float32 numpy ufunc (no fused multiply-add, no reduction), so
a version's bits do not depend on the CPU's vector width.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from shared.errors import ConfigError, CorruptVersionError

KINDS = ("sgd", "avgm", "adam", "yogi")
_MAGIC = b"fedq-server-state/1\n"
_HEAD = struct.Struct("<Q?")  # values per vector, whether v is present


@dataclass(frozen=True)
class ServerOpt:
    kind: str = "sgd"
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown server optimizer {self.kind!r}; use sgd, avgm, adam or yogi")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("--server-beta1 and --server-beta2 must be in [0, 1)")
        if not 0 < self.tau < math.inf:
            raise ConfigError(f"--server-tau must be a positive number, not {self.tau!r}")

    @property
    def stateful(self) -> bool:
        return self.kind != "sgd"

    def describe(self) -> str:
        """What ``parse`` reads back (floats in full, for exact replay)."""
        if self.kind == "sgd":
            return "sgd"
        return f"{self.kind}:{self.beta1!r},{self.beta2!r},{self.tau!r}"

    @classmethod
    def parse(cls, text: str) -> ServerOpt:
        kind, _, params = text.strip().partition(":")
        if not params:
            return cls(kind)
        try:
            beta1, beta2, tau = (float(p) for p in params.split(","))
        except ValueError:
            raise ConfigError(f"bad server optimizer {text!r}: use KIND or KIND:beta1,beta2,tau") from None
        return cls(kind, beta1, beta2, tau)

    def start(self, n: int) -> ServerState:
        """The moments before the first version: m = 0, v = tau^2."""
        v = np.full(n, np.float32(self.tau) * np.float32(self.tau), dtype=np.float32)
        return ServerState(np.zeros(n, dtype=np.float32), v if self.kind in ("adam", "yogi") else None)

    def step(
        self, x: torch.Tensor, d: torch.Tensor, lr: float, state: ServerState | None
    ) -> tuple[torch.Tensor, ServerState]:
        """The new floats and moments from floats ``x``, pseudo-gradient ``d`` and the parent's state."""
        n = x.numel()
        s = state if state is not None and state.size == n else self.start(n)
        m, v = s.m.copy(), None if s.v is None else s.v.copy()
        g = d.detach().numpy()
        b1, b2, eta = np.float32(self.beta1), np.float32(self.beta2), np.float32(lr)
        if self.kind == "avgm":
            np.multiply(m, b1, out=m)
            np.add(m, g, out=m)
            step = m * eta
        else:
            assert v is not None
            np.multiply(m, b1, out=m)
            np.add(m, g * (np.float32(1) - b1), out=m)
            g2 = g * g
            if self.kind == "adam":
                np.multiply(v, b2, out=v)
                np.add(v, g2 * (np.float32(1) - b2), out=v)
            else:  # yogi: v moves towards d^2 by (1 - beta2) d^2 at most
                np.subtract(v, (g2 * (np.float32(1) - b2)) * np.sign(v - g2), out=v)
            step = (m * eta) / (np.sqrt(v) + np.float32(self.tau))
        new = x.detach().numpy() + step
        return torch.from_numpy(new), ServerState(m, v)


@dataclass
class ServerState:
    """A server optimizer's moments after a version (float32, one per float value)."""

    m: np.ndarray
    v: np.ndarray | None

    @property
    def size(self) -> int:
        return int(self.m.size)

    def to_bytes(self) -> bytes:
        parts = [_MAGIC, _HEAD.pack(self.m.size, self.v is not None), self.m.astype("<f4").tobytes()]
        if self.v is not None:
            parts.append(self.v.astype("<f4").tobytes())
        return b"".join(parts)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, blob: bytes) -> ServerState:
        if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _HEAD.size:
            raise CorruptVersionError("not a fedq server optimizer state")
        n, has_v = _HEAD.unpack_from(blob, len(_MAGIC))
        start = len(_MAGIC) + _HEAD.size
        if len(blob) != start + 4 * n * (2 if has_v else 1):
            raise CorruptVersionError("server optimizer state has the wrong length")
        m = np.frombuffer(blob, dtype="<f4", count=n, offset=start).astype(np.float32)
        v = np.frombuffer(blob, dtype="<f4", count=n, offset=start + 4 * n).astype(np.float32) if has_v else None
        return cls(m, v)
