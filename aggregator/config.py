"""An aggregator's configuration: the policy it folds by and the job's queues it declares. Plain data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from aggregator.core import edge_problem
from shared.aggregation import WEIGHTINGS, Clip, Policy, Robust
from shared.errors import ConfigError
from shared.privacy import Dp
from shared.server_opt import ServerOpt
from shared.settings import Settings
from shared.staleness import Staleness

T = TypeVar("T")
# A partial's head lists each update (~150 bytes), within the codec's 64 KiB head cap: a refused
# partial folded again into a full buffer makes one of up to twice this many.
MAX_PARTIAL_UPDATES = 128


@dataclass(frozen=True)
class AggregatorConfig:
    policy: Policy
    capabilities: tuple[str, ...] = ("cpu",)  # the job's task queues, declared with the rest of its topology
    load_wait: float = 120.0  # seconds to wait for version 0 of a new job to appear in the store
    require_user_id: bool = False  # --broker-identity require: an update must name its broker user
    shards: int = 0  # edge aggregation: the job's shards (0: one aggregator folds every update)
    tier: str = "single"  # single | edge | root
    shard: int = 0  # an edge's shard

    @classmethod
    def from_settings(cls, settings: Settings) -> AggregatorConfig:
        tier = settings.aggregator_tier
        policy = policy_of_settings(settings)
        if tier != "single" and (problem := edge_problem(policy)):
            raise ConfigError(f"--tier {tier}: {problem}")
        if tier == "edge" and max(policy.k, policy.clip.warmup) > MAX_PARTIAL_UPDATES:
            raise ConfigError(
                f"--tier edge folds --buffer updates (and the clip's warm-up) into one partial, which lists "
                f"each: at most {MAX_PARTIAL_UPDATES}, not {max(policy.k, policy.clip.warmup)}"
            )
        return cls(
            policy,
            settings.capability_list,
            require_user_id=settings.user_id_required,
            shards=settings.shards,
            tier=tier,
            shard=settings.shard,
        )


def policy_of_settings(settings: Settings) -> Policy:
    """The policy the settings name. Central DP (``--dp-clip`` without ``--dp-local``) sets the
    clip to that fixed bound and weighs every update as one, whatever --clip and --weighting say."""
    dp = dp_of_settings(settings)
    clip = _parsed(Clip.parse, "--clip / FEDQ_CLIP", settings.clip)
    weighting = _parsed(_weighting, "--weighting / FEDQ_WEIGHTING", settings.weighting)
    if dp is not None and not dp.local:
        clip, weighting = Clip("fixed", dp.clip), "uniform"
    return Policy(
        mode=settings.mode,
        k=settings.buffer,
        server_lr=settings.server_lr,
        staleness=Staleness.parse(settings.staleness),
        max_staleness=settings.max_staleness,
        max_norm=settings.max_norm,
        clip=clip,
        robust=_parsed(Robust.parse, "--robust / FEDQ_ROBUST", settings.robust),
        weighting=weighting,
        alpha=settings.fedasync_alpha,
        server_opt=ServerOpt(
            _parsed(_known_opt, "--server-opt / FEDQ_SERVER_OPT", settings.server_opt),
            settings.server_beta1,
            settings.server_beta2,
            settings.server_tau,
        ),
        dp=dp,
    )


def dp_of_settings(settings: Settings) -> Dp | None:
    """The job's DP, or ``None`` without ``--dp-clip`` (``--dp-local`` alone is an error)."""
    if settings.dp_clip is None:
        if settings.dp_local:
            raise ConfigError("--dp-local needs --dp-clip: the norm each worker clips its update to")
        return None
    return Dp(settings.dp_clip, settings.dp_noise, settings.dp_delta, settings.dp_local)


def _known_opt(text: str) -> str:
    return ServerOpt(text).kind


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
