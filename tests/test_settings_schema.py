"""One settings schema (shared/settings.py) gives the CLI flags, the FEDQ_* variables and the help.

No broker: these tests only build parsers, parse arguments and read settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path

import pytest

from fedq.cli import _settings, build_parser
from fedq.run import _env, _flags
from shared.settings import (
    CONNECTION,
    GROUPS,
    Settings,
    env_name,
    env_only_settings,
    flags,
    known_env_names,
)

FIELDS = {f.name: f for f in dataclasses.fields(Settings)}

# The flags of every command, as users' scripts know them: a contract, written out by hand.
AMQP = {"amqp-url", "amqp-password-file", "amqp-ca", "amqp-cert", "amqp-key", "max-message-bytes"}
CONN = AMQP | {
    "namespace",
    "job",
    "store",
    "keys-dir",
    "trusted-keys",
    "coordinator-key",
    "key-file",
    "out",
    "app",
    "log-level",
    "metrics-port",
    "metrics-host",
    "s3-endpoint",
    "s3-region",
}
JOB = {
    "mode",
    "shards",
    "capabilities",
    "concurrency",
    "target-accuracy",
    "max-versions",
    "max-updates",
    "max-seconds",
    "task-ttl",
    "round-timeout",
    "local-epochs",
    "batch-size",
    "optimizer",
    "lr",
    "momentum",
    "quant",
    "block",
    "inline-limit",
    "model-seed",
    "worker-timeout",
    "min-workers",
    "min-workers-wait",
    "max-samples",
    "prox-mu",
    "dp-local",
}
POLICY = {
    "buffer",
    "server-lr",
    "staleness",
    "max-staleness",
    "max-norm",
    "clip",
    "robust",
    "weighting",
    "server-opt",
    "server-beta1",
    "server-beta2",
    "server-tau",
}
# policy flags the what-if replay does not take: fedasync and DP re-derive nothing it could compare
LIVE_POLICY = {"fedasync-alpha", "dp-clip", "dp-noise", "dp-delta"}
DATA = {"alpha", "partition-seed", "partition-file"}
WORKER = {
    "capability",
    "partition",
    "worker-id",
    "delay",
    "threads",
    "replicas",
    "heartbeat-interval",
    "outbox",
    "dp-floor-clip",
    "dp-floor-noise",
    "org",
}
KEYS = {"keys-dir", "trusted-keys", "coordinator-key", "key-file"}
WHERE = AMQP | {"namespace", "store", "out"}
MODEL_WHERE = WHERE | {"s3-endpoint", "s3-region", "keys-dir", "trusted-keys"}
SETTING_FLAGS = {
    "run": (CONN - KEYS) | JOB | POLICY | LIVE_POLICY | DATA | {"broker-users", "management-url", "broker-identity"},
    "coordinator": CONN | JOB | {"broker-identity", "dp-clip", "dp-noise", "dp-delta"},
    "aggregator": CONN
    | {"mode", "capabilities", "broker-identity", "dp-local", "shards", "tier", "shard"}
    | POLICY
    | LIVE_POLICY,
    "worker": CONN | WORKER | DATA,
    "audit": WHERE | {"shards"},
    "log": WHERE | {"trusted-keys"},
    "replay verify": WHERE | {"trusted-keys"},
    "replay what-if": WHERE | {"app"} | POLICY,
    "declare": AMQP | {"namespace", "capabilities", "shards"},
    **{f"dlq {a}": AMQP | {"namespace"} for a in ("list", "show", "requeue")},
    "broker apply": AMQP
    | {"namespace", "job", "capabilities", "keys-dir", "trusted-keys", "management-url", "shards"},
    "broker certs": set(),  # files only: it reaches no broker
    "cost": set(),  # a run folder's files only
    "status": WHERE,
    "dashboard": WHERE,
    "report": set(),  # a run folder's files only
    **{f"model {a}": MODEL_WHERE for a in ("list", "show", "export", "verify", "rollback")},
    **{f"keys {a}": {"keys-dir", "trusted-keys"} for a in ("init", "create", "enrol", "revoke", "list", "rotate")},
}
for _service in ("coordinator", "aggregator", "worker"):  # which of a cluster's URLs a service dials first
    SETTING_FLAGS[_service] = SETTING_FLAGS[_service] | {"amqp-first"}
# Each command's own options, which set no setting.
OWN_OPTIONS = {
    "run": {"--workers", "--delay-profile", "--no-progress", "--chaos"},
    "audit": {"--json", "--no-log"},
    "log": {"--from", "--worker", "--task", "--versions", "--json"},
    "replay verify": {"--version", "--all", "--json"},
    "replay what-if": {"--json", "--plot-dir"},
    "dlq list": {"--reason", "--json"},
    "dlq show": {"--json"},
    "dlq requeue": {"--all", "--reason", "--dry-run"},
    "model list": {"--json"},
    "model show": {"--json"},
    "model verify": {"--json"},
    "model rollback": {"--to", "--no-announce", "--json"},
    **{f"keys {a}": {"--json"} for a in ("init", "create", "revoke", "list", "rotate")},
    "keys enrol": {"--replace", "--json"},
    "broker apply": {"--workers", "--secrets", "--definitions-file", "--json"},
    "broker certs": {"--out", "--host", "--client", "--json"},
    "cost": {"--by", "--prices", "--csv"},
    "status": {"--once", "--json", "--interval"},
    "dashboard": {"--host", "--port", "--token", "--no-broker"},
    "report": {"-o", "--output"},
}
# What each command needs besides flags, to parse at all.
REQUIRED = {
    "audit": ["j"],
    "log": ["j"],
    "replay verify": ["j", "--all"],
    "replay what-if": ["j"],
    "dlq show": ["1"],
    "model list": ["j"],
    "model show": ["j", "3"],
    "model export": ["j", "3", "f.pt"],
    "model verify": ["j"],
    "model rollback": ["j", "--to", "2"],
    "keys create": ["w1"],
    "keys enrol": ["w1", "w1.pub"],
    "keys revoke": ["w1"],
    "keys rotate": ["coordinator"],
    "broker certs": ["--out", "d"],
    "cost": ["r"],
    "status": ["j"],
    "dashboard": ["j"],
    "report": ["r", "-o", "x.html"],
}
# A value per type, as text and as the setting then holds it: one for flags, one for the environment.
# A switch (bool) takes no text: given, it is on.
SAMPLE: dict[type, tuple[str | None, object]] = {
    str: ("from-flag", "from-flag"),
    int: ("7", 7),
    float: ("2.5", 2.5),
    bool: (None, True),
}
ENV_SAMPLE: dict[type, tuple[str, object]] = {
    str: ("from-env", "from-env"),
    int: ("3", 3),
    float: ("0.5", 0.5),
    bool: ("yes", True),
}


def leaf_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command that runs something, as "replay verify", with its parser."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs and path:
            found[path] = parser
        for action in subs:
            for name, child in action.choices.items():
                walk(child, f"{path} {name}".strip())

    walk(build_parser(), "")
    return found


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@functools.cache
def parser() -> argparse.ArgumentParser:
    """One parser for the module's many parses (a parse changes nothing in it)."""
    return build_parser()


def parse(command: str, *extra: str | None) -> argparse.Namespace:
    given = [e for e in extra if e is not None]  # a switch's sample has no text
    return parser().parse_args([*command.split(), *REQUIRED.get(command, []), *given])


def test_every_setting_has_a_flag_or_is_deliberately_env_only() -> None:
    flagged = {f.setting for f in flags()}
    env_only = env_only_settings()
    assert flagged | set(env_only) == set(FIELDS)
    assert not flagged & set(env_only)
    assert all(env_only.values()), "say why a setting has no flag"
    # secrets never as flags: a command line shows in ps
    assert {"s3_access_key", "s3_secret_key"} <= set(env_only)
    for f in flags():
        assert f.value_type in (str, int, float, bool), f.setting
        assert f.group in GROUPS and f.commands and f.help, f.setting
        assert f.env == env_name(f.setting) and f.env in known_env_names()
    assert len({f.name for f in flags()}) == len(flags())


def test_each_command_offers_exactly_its_flags() -> None:
    parsers = leaf_parsers()
    assert set(parsers) == set(SETTING_FLAGS)
    named = {c for f in flags() for c in f.commands}
    assert named <= set(parsers), f"the schema names commands fedq lacks: {named - set(parsers)}"
    for command, parser in parsers.items():
        settings = [a for a in options(parser) if a.dest in FIELDS]
        own = {s for a in options(parser) if a.dest not in FIELDS for s in a.option_strings}
        assert {a.option_strings[0][2:] for a in settings} == SETTING_FLAGS[command], command
        assert own == OWN_OPTIONS.get(command, set()), command
        by_setting = {f.setting: f for f in flags(command)}
        assert {a.dest for a in settings} == set(by_setting), command
        for action in settings:
            flag = by_setting[action.dest]
            assert action.option_strings == [flag.name], command
            switch = flag.value_type is bool
            assert action.type is (None if switch else flag.value_type), (command, flag.name)
            assert action.default is None and action.choices is None, (command, flag.name)
            assert action.nargs == (0 if switch else None), (command, flag.name)
            assert action.help and action.help.endswith(f"[{flag.env}]"), (command, flag.name)


def test_flags_parse_into_their_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in known_env_names():
        monkeypatch.delenv(name, raising=False)
    for command in SETTING_FLAGS:
        for flag in flags(command):
            text, value = SAMPLE[flag.value_type]
            settings = _settings(parse(command, flag.name, text))
            assert getattr(settings, flag.setting) == value, (command, flag.name)
        assert _settings(parse(command)) == Settings(), command  # nothing given: every default


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in known_env_names():
        monkeypatch.delenv(name, raising=False)
    for flag in flags():
        command = flag.commands[0]
        text, value = SAMPLE[flag.value_type]
        env_text, env_value = ENV_SAMPLE[flag.value_type]
        monkeypatch.setenv(flag.env, env_text)
        args = parse(command)
        assert getattr(args, flag.setting) is None  # not given: the flag stays out of the way
        assert getattr(_settings(args), flag.setting) == env_value, flag.name
        assert getattr(_settings(parse(command, flag.name, text)), flag.setting) == value, flag.name
        monkeypatch.delenv(flag.env)


def test_env_only_settings_are_read_from_the_environment() -> None:
    env = {"FEDQ_S3_SECRET_KEY": "s", "FEDQ_WEIGHT_DECAY": "0.01", "FEDQ_AMQP_HEARTBEAT": "4"}
    s = Settings.from_env(env)
    assert (s.s3_secret_key, s.weight_decay, s.amqp_heartbeat) == ("s", 0.01, 4)
    offered = {s for p in leaf_parsers().values() for a in options(p) for s in a.option_strings}
    for name in env_only_settings():
        assert "--" + name.replace("_", "-") not in offered


def test_fedq_run_hands_every_setting_to_its_processes(tmp_path: Path) -> None:
    """Each of the run's settings reaches the processes that take it: connection and environment-only
    settings through the environment, the others as the flags the schema gives those processes."""
    chosen = Settings(
        mode="sync",
        target_accuracy=0.5,
        buffer=3,
        max_norm=9.0,
        alpha=0.1,
        weight_decay=0.01,
        s3_secret_key="secret",
    )
    env = _env(chosen, tmp_path, tmp_path / "keys")
    for command in ("coordinator", "aggregator", "worker"):
        args = build_parser().parse_args([command, *_flags(chosen, command)])
        got = Settings.from_env(
            {k: v for k, v in env.items() if k.startswith("FEDQ_")},
            **{k: v for k, v in vars(args).items() if k in FIELDS},
        )
        for f in flags(command):
            if "run" in f.commands and f.setting not in ("keys_dir", "trusted_keys", "out"):
                assert getattr(got, f.setting) == getattr(chosen, f.setting), (command, f.setting)
        assert (got.weight_decay, got.s3_secret_key) == (0.01, "secret")
    for f in flags("run"):
        sent = f.group == CONNECTION or any(
            f.setting in {g.setting for g in flags(c)} for c in ("coordinator", "aggregator", "worker")
        )
        assert sent, f"fedq run takes {f.name} but hands it to none of its processes"
    assert "--s3-secret-key" not in " ".join(_flags(chosen, "worker"))
