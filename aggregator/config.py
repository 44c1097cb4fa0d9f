"""An aggregator's configuration: the policy it folds by and the job's queues it declares. Plain data."""

from __future__ import annotations

from dataclasses import dataclass

from shared.aggregation import Policy
from shared.settings import Settings
from shared.staleness import Staleness


@dataclass(frozen=True)
class AggregatorConfig:
    policy: Policy
    capabilities: tuple[str, ...] = ("cpu",)  # the job's task queues, declared with the rest of its topology
    load_wait: float = 120.0  # seconds to wait for version 0 of a new job to appear in the store

    @classmethod
    def from_settings(cls, settings: Settings) -> AggregatorConfig:
        policy = Policy(
            mode=settings.mode,
            k=settings.buffer,
            server_lr=settings.server_lr,
            staleness=Staleness.parse(settings.staleness),
            max_staleness=settings.max_staleness,
            max_norm=settings.max_norm,
        )
        return cls(policy, settings.capability_list)
