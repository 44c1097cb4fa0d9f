"""Every exchange, queue and routing key name in fedq comes from here."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import ConfigError

_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_token(kind: str, value: str) -> str:
    """Capabilities and job ids become parts of names and routing keys: keep them plain."""
    if not _TOKEN.fullmatch(value):
        raise ConfigError(
            f"invalid {kind} {value!r}: use letters, digits, '-' or '_' (at most 63 characters)"
        )
    return value


@dataclass(frozen=True)
class Names:
    """Names under one namespace (default ``fedq``); tests use a unique namespace each."""

    namespace: str = "fedq"

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.namespace):
            raise ConfigError(f"invalid namespace {self.namespace!r}")

    @property
    def tasks_exchange(self) -> str:
        return f"{self.namespace}.tasks"

    def task_queue(self, capability: str) -> str:
        return f"{self.namespace}.tasks.{check_token('capability', capability)}"

    @property
    def results_exchange(self) -> str:
        return f"{self.namespace}.results"

    @property
    def updates_queue(self) -> str:
        return f"{self.namespace}.updates"

    @property
    def update_log(self) -> str:
        return f"{self.namespace}.updates.log"

    @property
    def models_exchange(self) -> str:
        return f"{self.namespace}.models"

    @property
    def model_log(self) -> str:
        return f"{self.namespace}.models.log"

    @property
    def workers_exchange(self) -> str:
        return f"{self.namespace}.workers"

    @property
    def dead_exchange(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def dead_queue(self) -> str:
        return f"{self.namespace}.dead"

    def coordinator_queue(self, job_id: str) -> str:
        """The coordinator's durable inbox of announcements and receipts: survives its restarts."""
        return f"{self.namespace}.coordinator.{check_token('job id', job_id)}"

    @staticmethod
    def model_key(job_id: str) -> str:
        """Routing key of a model announcement on the models exchange."""
        return f"model.{check_token('job id', job_id)}"

    @staticmethod
    def receipt_key(job_id: str) -> str:
        """Routing key of an update receipt on the models exchange."""
        return f"receipt.{check_token('job id', job_id)}"


# Headers fedq sets on dead-lettered messages.
REASON_HEADER = "x-fedq-reason"
DETAIL_HEADER = "x-fedq-detail"
SOURCE_HEADER = "x-fedq-source"
