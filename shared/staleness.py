"""Staleness weights s(tau) for asynchronous aggregation (FedAsync / FedBuff)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.errors import ConfigError

KINDS = ("constant", "polynomial", "hinge")


@dataclass(frozen=True)
class Staleness:
    """``constant``: 1; ``polynomial``: (1+tau)^-a; ``hinge``: 1 if tau<=b else 1/(a(tau-b)+1)."""

    kind: str = "polynomial"
    a: float = 0.5
    b: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown staleness function {self.kind!r}; use one of {KINDS}")
        if not (0 <= self.a < math.inf and 0 <= self.b < math.inf):
            raise ConfigError("staleness parameters a and b must be finite and non-negative")

    def weight(self, tau: int) -> float:
        if tau < 0:
            raise ValueError("staleness cannot be negative")
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((1.0 + tau) ** -self.a)
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)

    @classmethod
    def parse(cls, text: str) -> Staleness:
        """Parse ``constant``, ``polynomial[:a]`` or ``hinge[:a,b]`` (e.g. ``hinge:10,4``)."""
        kind, _, params = text.partition(":")
        try:
            values = [float(v) for v in params.split(",")] if params else []
        except ValueError as exc:
            raise ConfigError(f"bad staleness parameters in {text!r}") from exc
        if kind == "constant" and not values:
            return cls("constant")
        if kind == "polynomial" and len(values) <= 1:
            return cls("polynomial", *(values or [0.5]))
        if kind == "hinge" and len(values) in (0, 2):
            a, b = values or [10.0, 4.0]
            return cls("hinge", a, b)
        raise ConfigError(f"bad staleness {text!r}: use constant, polynomial[:a] or hinge[:a,b]")

    def describe(self) -> str:
        if self.kind == "constant":
            return "constant"
        if self.kind == "polynomial":
            return f"polynomial:{self.a:g}"
        return f"hinge:{self.a:g},{self.b:g}"
