"""docs/metrics.md is the contract: every service's metrics after traffic, the dashboard and the alerts."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inference import grpc_service_pb2 as pb
from tests.integration.suite import Suite
from tests.models import affine_model

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "metrics.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "maas-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"

_UNITS = ("_seconds", "_bytes", "_requests", "_length", "_pending", "_streams", "_versions", "_models", "_workers")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
_PROMQL_WORDS = set(
    re.findall(
        r"\w+",
        # aggregations, functions and keywords that may appear in MaaS's expressions
        """
        sum min max avg count stddev stdvar topk bottomk quantile count_values group
        rate irate increase delta idelta deriv histogram_quantile absent absent_over_time clamp_min
        clamp_max abs ceil floor round sqrt exp ln log2 log10 time vector scalar sort sort_desc
        avg_over_time max_over_time min_over_time sum_over_time count_over_time last_over_time label_replace
        by without on ignoring group_left group_right and or unless bool offset inf nan
        """,
    )
)


@dataclass(frozen=True)
class Documented:
    """One row of docs/metrics.md."""

    type: str
    labels: frozenset[str]


def documented() -> dict[str, Documented]:
    """Metric name (as PromQL names it) -> its documented type and labels."""
    rows: dict[str, Documented] = {}
    for line in DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not re.fullmatch(r"`maas_\w+`", cells[0]):
            continue
        name = cells[0].strip("`")
        assert name not in rows, f"{name} documented twice"
        labels = frozenset(re.findall(r"`(\w+)`", cells[2]))
        rows[name] = Documented(cells[1], labels)
    return rows


def _exposed_name(family_name: str, family_type: str) -> str:
    """The name PromQL uses: prometheus_client's parser drops a counter's ``_total``."""
    return f"{family_name}_total" if family_type == "counter" else family_name


def scraped_families(text: str) -> dict[str, tuple[str, set[str], int]]:
    """MaaS families in an exposition: name -> (type, label names, samples other than ``_created``)."""
    families: dict[str, tuple[str, set[str], int]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("maas_") or family.name.endswith("_created"):
            continue  # process_*, python_*: standard collectors; *_created: the text format's timestamps
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        labels = {label for sample in samples for label in sample.labels if label != "le"}
        families[_exposed_name(family.name, family.type)] = (family.type, labels, len(samples))
    return families


def _infer_request(model: str, rows: int = 1, columns: int = 4) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, columns])
    request.raw_input_contents.append(np.ones((rows, columns), np.float32).tobytes())
    return request


async def _scrape() -> str:
    # NOTE: from another thread, as the metrics HTTP server scrapes: the queue and deployment
    # collectors refresh on this event loop, which must stay free meanwhile.
    return (await asyncio.to_thread(generate_latest, REGISTRY)).decode()


def _value(text: str, sample: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    raise AssertionError(f"no sample {sample}{labels} in the scrape")


MODEL = "metered"
"""A name no other test uses: the metrics registry is one per test process, and counts add up."""


async def _traffic(suite: Suite) -> None:
    await suite.push(MODEL, affine_model())
    for rows in (1, 2, 3):
        await suite.inference.ModelInfer(_infer_request(MODEL, rows), timeout=20)
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # a wrong shape: refused by the gateway
        await suite.inference.ModelInfer(_infer_request(MODEL, 1, 5), timeout=20)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert suite.worker is not None
    await suite.worker.run_until_empty()  # the entries acked (after their replies): the queue gauges read 0


async def test_every_service_exports_exactly_the_documented_metrics(suite: Suite) -> None:
    await _traffic(suite)
    text = await _scrape()
    scraped, doc = scraped_families(text), documented()
    assert sorted(set(scraped) - set(doc)) == [], "exported but not in docs/metrics.md"
    assert sorted(set(doc) - set(scraped)) == [], "documented but not exported"
    for name, (kind, labels, samples) in scraped.items():
        assert doc[name].type == kind, name
        if samples:
            assert labels == doc[name].labels, name
    # the traffic shows where it should: per model version, by code, queues, workers, deployments
    version = {"model": MODEL, "version": "1"}
    assert _value(text, "maas_gateway_requests_total", code="OK", **version) == 3
    assert _value(text, "maas_gateway_requests_total", code="INVALID_ARGUMENT", **version) == 1
    assert _value(text, "maas_gateway_request_duration_seconds_count", **version) == 4
    assert _value(text, "maas_inference_queue_wait_seconds_count", **version) == 3
    assert _value(text, "maas_inference_batch_size_requests_sum", **version) == 3
    assert _value(text, "maas_inference_model_load_seconds_count", **version) >= 1
    assert _value(text, "maas_gateway_replies_total", path="direct") >= 3  # straight from the worker
    assert _value(text, "maas_inference_queue_length", **version) == 0
    assert _value(text, "maas_inference_queue_pending", **version) == 0
    assert _value(text, "maas_inference_queue_oldest_age_seconds", **version) == 0
    assert _value(text, "maas_inference_workers", pool=suite.pool) == 1
    assert _value(text, "maas_inference_loaded_models", pool=suite.pool, **version) == 1
    assert _value(text, "maas_registry_deployed_versions", pool=suite.pool, **version) == 1


async def test_queue_gauges_show_a_backlog_no_worker_serves(suite: Suite) -> None:
    await suite.push("lonely", affine_model(), pool="nobody-serves-this")
    call = asyncio.ensure_future(suite.inference.ModelInfer(_infer_request("lonely"), timeout=1.5))
    await asyncio.sleep(0.5)
    text = await _scrape()
    version = {"model": "lonely", "version": "1"}
    # no worker loads it, so the registry's gauge is the only one naming it: what MaasNoLiveWorker uses
    assert _value(text, "maas_registry_deployed_versions", pool="nobody-serves-this", **version) == 1
    assert not any('model="lonely"' in line for line in text.splitlines() if "loaded_models{" in line)
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await call
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_names_follow_the_conventions() -> None:
    for name, row in documented().items():
        assert re.fullmatch(r"maas_[a-z0-9_]+", name), name
        assert row.type in {"counter", "gauge", "histogram"}, name
        assert name.endswith("_total") == (row.type == "counter"), name
        assert "_ms" not in name and "milliseconds" not in name, f"{name}: base units only"
        if row.type == "histogram":
            assert name.endswith(_UNITS), f"{name}: a histogram names its unit"
        assert not row.labels & {"request_id", "id", "le"}, f"{name}: unbounded or reserved label"


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression uses (strings, matchers, ranges and groupings removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\b\d+(\.\d+)?([eE][-+]?\d+)?[smhdwy]?\b", "", expr)
    return {token for token in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr) if token not in _PROMQL_WORDS}


def _allowed_names() -> set[str]:
    names: set[str] = set()
    for name, row in documented().items():
        names.add(name)
        if row.type == "histogram":
            names.update(name + suffix for suffix in _HISTOGRAM_SUFFIXES)
    return names


def test_the_tokenizer_finds_metric_names() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (model, le) (rate(a_bucket{code!="OK"}[5m]))) / on (model) b unless c > 0.5'
    ) == {"a_bucket", "b", "c"}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 10
    return exprs


def _alert_rules() -> list[dict[str, object]]:
    rules: list[dict[str, object]] = [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]
    return rules


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_dashboards_and_alerts_name_only_documented_metrics(source: str) -> None:
    exprs = _dashboard_exprs() if source == "dashboard" else [str(rule["expr"]) for rule in _alert_rules()]
    allowed = _allowed_names()
    for expr in exprs:
        used = metric_names(expr)
        assert used, f"no metric in {expr!r}"
        assert used <= allowed, f"{expr!r} names undocumented {sorted(used - allowed)}"


def test_the_alerts_the_issue_asks_for_have_durations_and_summaries() -> None:
    rules = {str(rule["alert"]): rule for rule in _alert_rules()}
    assert {"MaasQueueAgeOverBudget", "MaasNoLiveWorker", "MaasErrorRatio", "MaasDeadLetterGrowth"} <= set(rules)
    for name, rule in rules.items():
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), name
        annotations = rule["annotations"]
        assert isinstance(annotations, dict) and annotations.get("summary"), name


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = "\n".join(_dashboard_exprs())
    for name in (
        "maas_gateway_requests_total",  # throughput and errors by code
        "maas_gateway_request_duration_seconds_bucket",  # latency p50/p99 by model
        "maas_inference_queue_length",
        "maas_inference_queue_oldest_age_seconds",
        "maas_inference_batch_size_requests_sum",
        "maas_inference_workers",
    ):
        assert name in exprs, name
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs
