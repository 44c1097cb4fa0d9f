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
    """Names of one job under one namespace (default ``fedq``); tests use a unique namespace each.

    Exchanges, the update and model logs and the dead-letter queue belong to the namespace and
    are shared by its jobs; each job has queues of its own (``<ns>.job.<job>.…``), reached by
    routing keys that start with the job id, so jobs in one namespace never take each other's
    tasks, updates or hellos."""

    namespace: str = "fedq"
    job: str = "default"

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.namespace):
            raise ConfigError(f"invalid namespace {self.namespace!r}")
        check_token("job id", self.job)

    def for_job(self, job: str) -> Names:
        return Names(self.namespace, job)

    @property
    def job_prefix(self) -> str:
        """Every queue of this job starts with it."""
        return f"{self.namespace}.job.{self.job}."

    # -- tasks: coordinator -> workers ---------------------------------------------------------
    @property
    def tasks_exchange(self) -> str:
        return f"{self.namespace}.tasks"

    def task_key(self, capability: str) -> str:
        """Routing key of this job's tasks for ``capability`` on the (direct) tasks exchange."""
        return f"{self.job}.{check_token('capability', capability)}"

    def task_queue(self, capability: str) -> str:
        return f"{self.job_prefix}tasks.{check_token('capability', capability)}"

    # -- updates (and rounds): workers, coordinator -> aggregator ---------------------------------
    @property
    def results_exchange(self) -> str:
        return f"{self.namespace}.results"

    @property
    def results_key(self) -> str:
        """Routing key of this job's updates and rounds on the (topic) results exchange."""
        return self.job

    @property
    def updates_queue(self) -> str:
        return f"{self.job_prefix}updates"

    def update_key(self, shard: int = -1) -> str:
        """Routing key of an update on the results exchange: the job's, or its shard's when the job
        folds its updates in edge aggregators (``--shards``)."""
        return self.results_key if shard < 0 else f"{self.job}.shard.{shard}"

    def shard_queue(self, shard: int) -> str:
        """Shard ``shard``'s updates: one edge aggregator consumes it (single active consumer)."""
        return f"{self.job_prefix}updates.shard.{shard}"

    @property
    def partials_key(self) -> str:
        """Routing key of the edges' partial aggregates on the results exchange."""
        return f"{self.job}.partials"

    @property
    def partials_queue(self) -> str:
        """The root aggregator's input: every edge's partial aggregates (single active consumer)."""
        return f"{self.job_prefix}partials"

    def edge_inbox(self, shard: int) -> str:
        """Shard ``shard``'s edge aggregator's inbox: the job's version announcements and the root's
        refusals of its partials; durable, so that a standby or a restart reads what it missed."""
        return f"{self.job_prefix}edge.{shard}"

    @property
    def update_log(self) -> str:
        """The stream of every update of every job in the namespace."""
        return f"{self.namespace}.updates.log"

    # -- versions and receipts: aggregator -> coordinator ------------------------------------------
    @property
    def models_exchange(self) -> str:
        return f"{self.namespace}.models"

    @property
    def model_log(self) -> str:
        return f"{self.namespace}.models.log"

    @staticmethod
    def model_key(job_id: str) -> str:
        """Routing key of a job's version announcements on the models exchange."""
        return f"model.{check_token('job id', job_id)}"

    @staticmethod
    def receipt_key(job_id: str) -> str:
        """Routing key of a job's update receipts on the models exchange."""
        return f"receipt.{check_token('job id', job_id)}"

    @staticmethod
    def verdict_key(job_id: str, shard: int) -> str:
        """Routing key of the root's verdicts on shard ``shard``'s partials on the models exchange."""
        return f"verdict.{check_token('job id', job_id)}.{shard}"

    @property
    def coordinator_queue(self) -> str:
        """The coordinator's durable inbox of announcements and receipts: survives its restarts."""
        return f"{self.job_prefix}coordinator"

    @property
    def listener_prefix(self) -> str:
        """Exclusive queues of this job's live subscriptions (the coordinator's hellos): named by us,
        so that a broker user may be allowed exactly these (a robust connection would otherwise
        name them ``amq_<uuid>``)."""
        return f"{self.job_prefix}listen."

    # -- hellos: workers -> coordinator --------------------------------------------------------
    @property
    def workers_exchange(self) -> str:
        return f"{self.namespace}.workers"

    @property
    def hello_key(self) -> str:
        """Routing key of the hellos of this job's workers on the (topic) workers exchange."""
        return self.job

    # -- dead letters ----------------------------------------------------------------------------
    @property
    def dead_exchange(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def dead_queue(self) -> str:
        return f"{self.namespace}.dead"

    def job_of_queue(self, queue: str) -> str | None:
        """The job whose queue ``queue`` is (in this namespace), if it is one."""
        prefix = f"{self.namespace}.job."
        if not queue.startswith(prefix):
            return None
        job = queue[len(prefix) :].partition(".")[0]
        return job if _TOKEN.fullmatch(job) else None


# Headers fedq sets on dead-lettered messages.
REASON_HEADER = "x-fedq-reason"
DETAIL_HEADER = "x-fedq-detail"
SOURCE_HEADER = "x-fedq-source"
USER_HEADER = "x-fedq-user"  # the broker user that published it (its user_id)
