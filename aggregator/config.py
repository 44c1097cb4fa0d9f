"""An aggregator's configuration: the policy it folds by and the job's queues it declares. Plain data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from shared.aggregation import WEIGHTINGS, Clip, Policy, Robust
from shared.errors import ConfigError
from shared.settings import Settings
from shared.staleness import Staleness

T = TypeVar("T")


@dataclass(frozen=True)
class AggregatorConfig:
    policy: Policy
    capabilities: tuple[str, ...] = ("cpu",)  # the job's task queues, declared with the rest of its topology
    load_wait: float = 120.0  # seconds to wait for version 0 of a new job to appear in the store
    require_user_id: bool = False  # --broker-identity require: an update must name its broker user

    @classmethod
    def from_settings(cls, settings: Settings) -> AggregatorConfig:
        policy = Policy(
            mode=settings.mode,
            k=settings.buffer,
            server_lr=settings.server_lr,
            staleness=Staleness.parse(settings.staleness),
            max_staleness=settings.max_staleness,
            max_norm=settings.max_norm,
            clip=_parsed(Clip.parse, "--clip / FEDQ_CLIP", settings.clip),
            robust=_parsed(Robust.parse, "--robust / FEDQ_ROBUST", settings.robust),
            weighting=_parsed(_weighting, "--weighting / FEDQ_WEIGHTING", settings.weighting),
        )
        return cls(policy, settings.capability_list, require_user_id=settings.user_id_required)


def _weighting(text: str) -> str:
    if text not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {text!r}; use samples or uniform")
    return text


def _parsed(parse: Callable[[str], T], where: str, text: str) -> T:
    """``parse(text)``, its ``ConfigError`` naming the flag and variable the text came from."""
    try:
        return parse(text)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
