"""deploy/: the Grafana dashboard, the Prometheus alert rules and their compose services, validated
statically (no promtool or Docker here): structure, and every metric they query is one domain/metrics.py
exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics_core import Metric

from domain.metrics import LedgerMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BUILTIN = {"up"}  # Prometheus' own per-target series


def exported() -> set[str]:
    """Every series name LedgerMetrics can expose (counters' _total, histograms' _bucket/_sum/_count)."""
    names: set[str] = set()
    for family in LedgerMetrics().registry.collect():
        m: Metric = family
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}[m.type]
        names.update(m.name + s for s in suffixes)
    return names


def queried(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label names or
    parts of strings/durations."""
    expr = re.sub(r'"[^"]*"', '""', expr)              # label values
    expr = re.sub(r"\{[^}]*\}", "{}", expr)             # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)              # range selectors
    keywords = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if m.group() not in keywords and not expr[m.end():].lstrip().startswith("("):  # not a function
            names.add(m.group())
    return names


def test_the_parser_finds_metric_names():
    assert queried('histogram_quantile(0.95, sum by (kind, le) (rate(foundry_job_queue_wait_seconds_bucket[5m])))') \
        == {"foundry_job_queue_wait_seconds_bucket"}
    assert queried('sum(rate(foundry_jobs_finished_total{status=~"failed|dead"}[1h])) / clamp_min(x_y, 1e-9) '
                   '> (14.4 * 0.01) and up{job="foundry"} == 0') == {"foundry_jobs_finished_total", "x_y", "up"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "foundry.json").read_text())


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_dashboard_structure_and_metrics(dashboard):
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    names = exported() | BUILTIN
    queried_all: set[str] = set()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"] and p["datasource"]["uid"] == "prometheus", p["title"]
        for t in p["targets"]:
            found = queried(t["expr"])
            assert found and found <= names, (p["title"], found - names)
            queried_all |= found
    for var in dashboard["templating"]["list"]:
        metric = re.fullmatch(r"label_values\((\w+), *\w+\)", var["query"]["query"]).group(1)
        assert metric in names, var["name"]
    # what the operators asked for: queue depth, wait, durations, failures, cost per tenant, GPU memory
    for needed in ("foundry_queue_depth", "foundry_job_queue_wait_seconds_bucket", "foundry_job_duration_seconds_bucket",
                   "foundry_job_failures_total", "foundry_cost_total", "foundry_worker_gpu_free_bytes",
                   "foundry_gpu_memory_bytes"):
        assert needed in queried_all, needed
    cost = next(p for p in dashboard["panels"] if p["title"].startswith("Cost per tenant"))
    assert "by (tenant" in cost["targets"][0]["expr"]


def test_alert_rules_structure_and_metrics(rules):
    names = exported() | BUILTIN
    alerts = {r["alert"]: r for r in rules}
    assert len(alerts) == len(rules)
    for name, r in alerts.items():
        assert r["expr"].strip() and r["labels"]["severity"] in ("page", "ticket"), name
        assert r["annotations"]["summary"], name
        if "for" in r:
            assert re.fullmatch(r"\d+[smh]", r["for"]), name
        found = queried(r["expr"])
        assert found and found <= names, (name, found - names)
    assert {"FoundryDeadLettersGrowing", "FoundryStaleRunningJobs", "FoundryErrorBudgetFastBurn",
            "FoundryErrorBudgetSlowBurn"} <= set(alerts)
    assert "foundry_dead_jobs" in alerts["FoundryDeadLettersGrowing"]["expr"]
    assert "foundry_stale_running_jobs" in alerts["FoundryStaleRunningJobs"]["expr"]
    # both windows of a burn-rate alert test the same threshold
    for name in ("FoundryErrorBudgetFastBurn", "FoundryErrorBudgetSlowBurn"):
        assert len(set(re.findall(r"> \(([\d.]+ \* 0\.01)\)", alerts[name]["expr"]))) == 1, name


def test_prometheus_config_scrapes_the_metrics_service_with_auth_and_loads_the_rules():
    text = (DEPLOY / "prometheus" / "prometheus.yml.in").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["rule_files"] == ["/etc/prometheus/alerts.yml"]
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "foundry")
    assert job["static_configs"][0]["targets"] == ["metrics:9808"]
    assert job["basic_auth"]["username"] == "__METRICS_USER__" and job["basic_auth"]["password_file"]


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def _mounts(svc: dict) -> dict[str, Path]:
    out = {}
    for v in svc["volumes"]:
        src, dst = v.split(":")[:2]
        if src.startswith("./"):
            out[dst] = ROOT / src[2:]
    return out


def test_compose_provisions_prometheus_and_grafana_on_loopback_with_auth(services):
    prom, graf = services["prometheus"], services["grafana"]
    for svc in (prom, graf):
        assert svc["image"].split(":")[1][0].isdigit() or svc["image"].split(":")[1].startswith("v")  # pinned
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"])
        assert svc["healthcheck"]["test"]
        for dst, src in _mounts(svc).items():
            assert src.exists(), (dst, src)
    pm = _mounts(prom)
    assert pm["/etc/prometheus/alerts.yml"] == DEPLOY / "prometheus" / "alerts.yml"
    command = " ".join(prom["command"])
    assert "/etc/prometheus/prometheus.yml.in" in command and "__METRICS_USER__" in command
    assert "FOUNDRY_METRICS_PASSWORD" not in prom["environment"] and "metrics_password" in prom["secrets"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml.in").read_text())["scrape_configs"][0]
    assert scrape["basic_auth"]["password_file"] == "/run/secrets/metrics_password"
    env = graf["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    gm = _mounts(graf)
    assert gm["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/foundry.yml").read_text())["providers"][0]
    assert gm[provider["options"]["path"]] == DEPLOY / "grafana" / "dashboards"
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert ds["uid"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["type"] == "prometheus"
