"""The Grafana dashboard (monitoring/grafana/dashboards/fedq.json) and its provisioning in compose.yaml:
every panel's query names only metrics fedq exports and parses as PromQL (Debian's promtool, from the
prometheus package scripts/bootstrap --tests installs), and compose brings up a Prometheus that scrapes every fedq service
and a Grafana that loads this dashboard over that Prometheus. No Docker engine here: like
test_compose.py, these hold the files to each other and to the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from shared.metrics import METRICS, exported_names
from tests.support.jobs import ROOT
from tests.test_compose import compose, fedq_services, settings_of

DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "fedq.json"
GROUPING = ("by", "without", "on", "ignoring", "group_left", "group_right")
PROMQL_WORDS = frozenset((*GROUPING, "and", "or", "unless", "bool", "offset"))
# Grafana's variables, as a value each for promtool
GRAFANA_VARIABLES = {"$job": "demo", "$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict) and doc.get("panels"), f"{DASHBOARD} has no panels"
    return doc


def queries(doc: dict[str, Any]) -> dict[str, list[str]]:
    """Each panel's title -> its PromQL expressions."""
    return {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in doc["panels"]}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label matchers,
    ranges, grouping clauses, Grafana variables, functions and keywords are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(rf"\b(?:{'|'.join(GROUPING)})\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+", " ", text)
    words = re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", text)
    return {w for w in words if w not in PROMQL_WORDS}


def test_metric_names_are_found_in_promql() -> None:
    assert metric_names(
        'histogram_quantile(0.9, sum by (le) (rate(fedq_update_staleness_bucket{job="$job",role="a"}[5m])))'
    ) == {"fedq_update_staleness_bucket"}
    assert metric_names("sum(rate(a_total[1m])) / (b + c or d) * 60 > bool 1e3") == {"a_total", "b", "c", "d"}


def test_every_panel_queries_only_metrics_fedq_exports() -> None:
    doc = dashboard()
    exported = exported_names()
    shown: set[str] = set()
    for title, exprs in queries(doc).items():
        assert exprs, f"panel {title!r} has no query"
        for expr in exprs:
            names = metric_names(expr)
            assert names, f"panel {title!r}: {expr!r} names no metric"
            unknown = sorted(names - exported)
            assert not unknown, f"panel {title!r} queries {unknown}, which fedq does not export"
            shown |= names
    for variable in doc["templating"]["list"]:
        found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"])
        assert found and found[1] in exported, variable["query"]
    # and the dashboard shows every metric fedq exports, in one series or another
    families = {f.name for m in METRICS for f in m.describe()}
    missing = {f for f in families if not any(n == f or n.startswith(f + "_") for n in shown)}
    assert not missing, f"no panel shows {sorted(missing)}"


def test_every_query_parses(tmp_path: Path) -> None:
    """Each expression, Grafana's variables filled in, as a recording rule that promtool checks."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: apt-get install prometheus (scripts/bootstrap --tests does)", pytrace=False)
    rules = []
    for n, expr in enumerate(e for exprs in queries(dashboard()).values() for e in exprs):
        for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable promtool cannot stand in for: {expr}"
        rules.append({"record": f"fedq:panel_query:{n}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Where each file or folder of the repository is mounted in the service's container."""
    out = {}
    for v in service.get("volumes", []):
        parts = v.split(":")
        if parts[0].startswith("./"):
            out[parts[1]] = ROOT / parts[0]
    return out


def in_container(service: dict[str, Any], path: str) -> Path:
    """The repository path that the container sees at ``path`` (through a bind mount)."""
    for target, source in sorted(mounts(service).items(), key=lambda kv: -len(kv[0])):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source / path[len(target) :].lstrip("/")
    raise AssertionError(f"nothing of the repository is mounted at {path}")


def test_compose_scrapes_every_fedq_service() -> None:
    prometheus = compose()["services"]["prometheus"]
    config_flag = next(c for c in prometheus["command"] if c.startswith("--config.file="))
    config_path = in_container(prometheus, config_flag.partition("=")[2])
    assert config_path.samefile(ROOT / "monitoring" / "prometheus.yml")
    config = yaml.safe_load(config_path.read_text())
    (scrape,) = config["scrape_configs"]
    assert scrape["honor_labels"] is True, "without honor_labels fedq's job label becomes exported_job"
    targets = {t for group in scrape["static_configs"] for t in group["targets"]}
    expected = set()
    for name, service in fedq_services().items():
        s = settings_of(service)
        assert s.metrics_port > 0, f"{name} serves no metrics (FEDQ_METRICS_PORT)"
        assert s.metrics_host not in ("127.0.0.1", "localhost"), f"{name}: prometheus cannot reach it"
        expected.add(f"{name}:{s.metrics_port}")
    assert targets == expected
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: apt-get install prometheus (scripts/bootstrap --tests does)", pytrace=False)
    checked = subprocess.run([promtool, "check", "config", str(config_path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_compose_provisions_the_dashboard_over_prometheus() -> None:
    services = compose()["services"]
    grafana, prometheus = services["grafana"], services["prometheus"]
    provisioning = in_container(grafana, "/etc/grafana/provisioning")
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    (datasource,) = sources["datasources"]
    url = urlsplit(datasource["url"])
    published = {str(p).rsplit(":", 1)[1] for p in prometheus["ports"]}  # container ports
    assert datasource["type"] == "prometheus" and url.hostname == "prometheus" and str(url.port) in published
    doc = dashboard()
    uids = {p["datasource"]["uid"] for p in doc["panels"]} | {
        t["datasource"]["uid"] for p in doc["panels"] for t in p["targets"]
    }
    assert uids == {datasource["uid"]}, "every panel queries the provisioned Prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "fedq.yaml").read_text())["providers"]
    folder = in_container(grafana, provider["options"]["path"])
    assert (folder / DASHBOARD.name).samefile(DASHBOARD), "Grafana loads another file"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert in_container(grafana, home).samefile(DASHBOARD)
    assert "prometheus" in grafana.get("depends_on", [])
