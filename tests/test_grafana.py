"""The Grafana dashboards in grafana/: importable JSON models, and every query they run parses and
returns data on a real Prometheus scraping the agent and its simulated fleet."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from perfagent.app import create_app
from perfagent.settings import load_settings
from tests.conftest import free_port
from tests.prometheus import prometheus_binary, running_prometheus

GRAFANA = Path(__file__).resolve().parent.parent / "grafana"
DASHBOARD_FILES = (
    "fleet-overview.json",
    "instance-drilldown.json",
    "findings-timeline.json",
    "agent-health.json",
    "slo.json",
)
# The built-in simulated fleet (perfagent/demo.py): vllm-3 is overloaded, sglang-5 gets long prompts
# that share no prefix; the others are steady.
SIM_IDS = ("vllm-0", "tgi-1", "sglang-2", "vllm-3", "tgi-4", "sglang-5")
OVERLOADED = "vllm-3"
# What Grafana substitutes for its built-in variables (a 1 s scrape interval in the test).
BUILTINS = {"__rate_interval": "30s", "__interval": "5s", "__range": "5m"}
DATASOURCE_REFS = {"${datasource}", "$datasource"}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)$", re.DOTALL)

# Queries allowed to return nothing for an engine that lacks the signal: (dashboard uid, panel title,
# refId) -> (engines, why). Every other query must speak for every instance of the fleet, so a broken
# branch for one engine in an `or` of three fails.
_NO_TGI_KV = "TGI exports no KV capacity, so no usage ratio"
_NO_TGI_CACHE = "TGI exports no prefix-cache metric"
_NO_TGI_PREEMPT = "TGI reserves prompt + max_new_tokens up front and never preempts"
ENGINE_GAPS: dict[tuple[str, str, str], tuple[set[str], str]] = {
    ("perfagent-fleet", "Instances", "E"): ({"tgi"}, _NO_TGI_KV),
    ("perfagent-fleet", "KV-cache usage", "A"): ({"tgi"}, _NO_TGI_KV),
    ("perfagent-fleet", "Prefix-cache hit rate", "A"): ({"tgi"}, _NO_TGI_CACHE),
    ("perfagent-fleet", "Preemptions / s", "A"): ({"tgi"}, _NO_TGI_PREEMPT),
    ("perfagent-instance", "KV cache", "A"): ({"tgi"}, _NO_TGI_KV),
    ("perfagent-instance", "KV cache", "B"): (
        {"vllm", "sglang"},
        "the reserved-token line is TGI's stand-in",
    ),
    ("perfagent-instance", "Prefix-cache hit rate", "A"): ({"tgi"}, _NO_TGI_CACHE),
    ("perfagent-instance", "Preemptions / s", "A"): ({"tgi"}, _NO_TGI_PREEMPT),
}
# A query about findings (perfagent_bottleneck_*) speaks only for instances where a rule holds: it must
# cover the one where a finding is certain (vllm-3's queue only grows), not the steady ones.
FINDINGS_METRIC = "perfagent_bottleneck_"

# User rules that replace built-ins by name with `for: 0s` (and no look-back window), so findings of
# three types fire within seconds; `keep_firing_for` bridges 1 s windows in which no request finished.
# SlowQueueBuildup stays pending on the overloaded instance.
FAST_RULES = """\
groups:
  - name: grafana-test
    rules:
      - name: QueueBuildup
        type: QUEUE_BUILDUP
        quantity: requests_waiting
        op: ">"
        thresholds: {MEDIUM: 5, HIGH: 20, CRITICAL: 50}
        recommendation: Add replicas.
      - name: HighTTFT
        type: HIGH_LATENCY
        quantity: ttft_seconds_p99
        op: ">"
        thresholds: {MEDIUM: 0.5, HIGH: 1, CRITICAL: 2}
        keep_firing_for: 1m
        recommendation: Add replicas.
      - name: LowPrefixCacheHitRate
        type: CACHE_INEFFICIENCY
        engines: [vllm, sglang]
        quantity: prefix_cache_hit_rate
        op: "<"
        thresholds: {LOW: 0.2, MEDIUM: 0.05}
        and:
          - {quantity: prompt_tokens_per_second, op: ">", value: 100}
        keep_firing_for: 1m
        recommendation: Enable prefix caching.
      - name: SlowQueueBuildup
        type: QUEUE_BUILDUP
        quantity: requests_waiting
        op: ">"
        thresholds: {MEDIUM: 5}
        for: 1h
        recommendation: Add replicas.
"""


def _engine(instance_id: str) -> str:
    return instance_id.rsplit("-", 1)[0]


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GRAFANA / name).read_text(encoding="utf-8"))
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every query panel, including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def _variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in dashboard["templating"]["list"]}


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(path, key, value) of every key of every object in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk(item, f"{path}[{i}]")


def _substitute(text: str, values: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"undefined variable ${name} in {text!r}")
        return values[name]

    return VARIABLE.sub(replace, text)


def _variable_query(var: dict[str, Any]) -> str:
    query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
    assert isinstance(query, str)
    return query


def _as_promql(variable_query: str) -> str:
    """`label_values(selector, label)` as an instant query whose series carry the label values."""
    match = LABEL_VALUES.match(variable_query.strip())
    assert match is not None, f"unsupported variable query {variable_query!r}"
    return f"group by ({match['label']}) ({match['selector']})"


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(panel title, refId, expr) of every panel target and annotation."""
    for panel in _panels(dashboard):
        for target in panel["targets"]:
            yield panel["title"], target["refId"], target["expr"]
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            yield f"annotation {annotation['name']}", "-", annotation["expr"]


# -- the JSON models -----------------------------------------------------------------------------------


def test_dashboards_have_unique_uids_and_titles() -> None:
    dashboards = [_load(name) for name in DASHBOARD_FILES]
    uids = [d["uid"] for d in dashboards]
    assert len(set(uids)) == len(uids), uids
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid) for uid in uids), uids
    titles = [d["title"] for d in dashboards]
    assert len(set(titles)) == len(titles), titles


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_datasource_is_a_template_variable(name: str) -> None:
    dashboard = _load(name)
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert "__inputs" not in dashboard, "the datasource is a template variable, not an import input"
    datasource = _variables(dashboard)["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    # No hard-coded datasource anywhere: every reference is the variable.
    for path, key, value in _walk(dashboard):
        if key == "datasource":
            assert isinstance(value, dict), f"{path}: datasource {value!r} is not a reference"
            assert value.get("type") == "prometheus", f"{path}: {value!r}"
            assert value.get("uid") in DATASOURCE_REFS, f"{path}: hard-coded uid {value!r}"


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_every_panel_has_a_datasource_and_queries(name: str) -> None:
    dashboard = _load(name)
    variables = _variables(dashboard)
    ids = [p["id"] for p in dashboard["panels"]] + [
        p["id"] for row in dashboard["panels"] if row["type"] == "row" for p in row.get("panels", [])
    ]
    assert len(set(ids)) == len(ids), f"duplicate panel ids {ids}"
    titles = [p["title"] for p in _panels(dashboard)]
    assert len(set(titles)) == len(titles), f"duplicate panel titles {titles}"  # a title names a panel here
    for panel in _panels(dashboard):
        title = f"panel {panel['title']!r}: "
        assert panel.get("datasource", {}).get("uid") in DATASOURCE_REFS, title + "no datasource"
        assert panel.get("targets"), title + "no targets"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), title + f"duplicate refIds {refs}"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), title + f"target {target['refId']} has no expr"
            assert target.get("datasource", {}).get("uid") in DATASOURCE_REFS, title + "target datasource"
        if "repeat" in panel:
            assert variables[panel["repeat"]].get("multi"), title + "repeats over a single-value variable"


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_panels_fit_the_grid_without_overlapping(name: str) -> None:
    boxes = []
    for panel in _load(name)["panels"]:
        grid = panel["gridPos"]
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        assert w > 0 and h > 0 and x >= 0 and x + w <= 24, panel["title"]
        boxes.append((panel["title"], x, y, x + w, y + h))
    for i, (t1, x1, y1, x2, y2) in enumerate(boxes):
        for t2, u1, v1, u2, v2 in boxes[i + 1 :]:
            assert x2 <= u1 or u2 <= x1 or y2 <= v1 or v2 <= y1, f"{t1!r} overlaps {t2!r}"


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_every_variable_used_is_defined(name: str) -> None:
    dashboard = _load(name)
    variables = _variables(dashboard)
    known = {var: "x" for var in variables} | BUILTINS
    for _, _, expr in _queries(dashboard):
        _substitute(expr, known)  # raises KeyError on an undefined variable
    for panel in _panels(dashboard):
        _substitute(panel["title"], known)
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"]["uid"] in DATASOURCE_REFS, var["name"]
            _as_promql(_substitute(_variable_query(var), known))


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_links_point_at_these_dashboards(name: str) -> None:
    uids = {_load(other)["uid"] for other in DASHBOARD_FILES}
    for path, key, value in _walk(_load(name)):
        if key == "url" and isinstance(value, str):
            for uid in re.findall(r"/d/([A-Za-z0-9_-]+)", value):
                assert uid in uids, f"{path}: link to unknown dashboard {uid}"


@pytest.mark.parametrize("name", DASHBOARD_FILES)
def test_readme_describes_every_dashboard(name: str) -> None:
    readme = (GRAFANA / "README.md").read_text(encoding="utf-8")
    assert name in readme and _load(name)["title"] in readme


# -- every query against a real Prometheus --------------------------------------------------------------


def _post_query(base_url: str, query: str) -> dict[str, Any]:
    request = urllib.request.Request(
        base_url + "/api/v1/query", data=urllib.parse.urlencode({"query": query}).encode()
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body: dict[str, Any] = json.load(response)
            return body
    except urllib.error.HTTPError as exc:
        try:  # Prometheus answers a bad query with 400 and a JSON error body
            error: dict[str, Any] = json.load(exc)
            return error
        finally:
            exc.close()


async def _query(base_url: str, query: str) -> dict[str, Any]:
    return await asyncio.to_thread(_post_query, base_url, query)


def _samples(body: dict[str, Any]) -> list[tuple[dict[str, str], float]]:
    data = body["data"]
    if data["resultType"] in ("scalar", "string"):
        return [({}, float(data["result"][1]))]
    return [(series["metric"], float(series["value"][1])) for series in data["result"]]


def _scrape_configs(port: int) -> str:
    # The agent's own series carry `instance` = the engine instance id: honor_labels keeps it. Each
    # engine target is relabeled to that same id, as the dashboards' README asks of a deployment.
    lines = [
        "scrape_configs:",
        "  - job_name: perfagent",
        "    honor_labels: true",
        "    static_configs:",
        f"      - targets: ['127.0.0.1:{port}']",
    ]
    for instance_id in SIM_IDS:
        lines += [
            f"  - job_name: {instance_id}",
            f"    metrics_path: /sim/instances/{instance_id}/metrics",
            "    static_configs:",
            f"      - targets: ['127.0.0.1:{port}']",
            "    relabel_configs:",
            "      - target_label: instance",
            f"        replacement: {instance_id}",
        ]
    return "\n".join(lines) + "\n"


async def _variable_values(base_url: str, var: dict[str, Any], values: dict[str, str]) -> list[str]:
    if var["type"] == "custom":
        return [str(option["value"]) for option in var["options"]]
    query = _substitute(_variable_query(var), values)
    label = var["name"] if (match := LABEL_VALUES.match(query.strip())) is None else match["label"]
    body = await _query(base_url, _as_promql(query))
    return sorted({metric[label] for metric, _ in _samples(body) if label in metric})


async def _bindings(base_url: str, dashboard: dict[str, Any], problems: list[str]) -> list[dict[str, str]]:
    """The variable values to test a dashboard with: "All" of a multi-value variable (its custom all
    value, or the values found, joined as Grafana does), and each value of a single-value one."""
    values = dict(BUILTINS)
    singles: list[dict[str, str]] = [{}]
    for var in dashboard["templating"]["list"]:
        name = var["name"]
        if var["type"] == "datasource":
            continue
        found = await _variable_values(base_url, var, values)
        if not found:
            problems.append(f"{dashboard['uid']}: variable ${name} has no values")
        if name == "instance" and set(found) != set(SIM_IDS):
            problems.append(f"{dashboard['uid']}: $instance offers {found}, not the fleet {list(SIM_IDS)}")
        if var.get("multi") and var.get("allValue"):
            values[name] = var["allValue"]
        elif var.get("multi"):
            assert all(re.fullmatch(r"[\w:.-]+", v) for v in found), found  # safe in a regex unescaped
            values[name] = "(" + "|".join(found) + ")"
        else:
            values[name] = found[0] if found else ""
            singles = [binding | {name: value} for binding in singles for value in found]
    return [values | binding for binding in singles]


def _covered(
    bindings: list[dict[str, str]], results: list[list[tuple[dict[str, str], float]]]
) -> set[str] | None:
    """The fleet instances a query returned data for: the instance of each single-instance binding that
    returned anything, or the `instance` labels of the series; None when the series name none."""
    covered: set[str] = set()
    per_instance = False
    for values, samples in zip(bindings, results, strict=True):
        if values.get("instance") in SIM_IDS:
            per_instance = True
            if samples:
                covered.add(values["instance"])
        else:
            covered |= {metric["instance"] for metric, _ in samples if metric.get("instance") in SIM_IDS}
    return covered if per_instance or covered else None


async def _check_dashboard(base_url: str, dashboard: dict[str, Any]) -> list[str]:
    """Problems with one dashboard's queries on the live Prometheus (empty when all is well)."""
    uid = dashboard["uid"]
    problems: list[str] = []
    bindings = await _bindings(base_url, dashboard, problems)
    queries = list(_queries(dashboard))
    bodies = await asyncio.gather(
        *(_query(base_url, _substitute(expr, values)) for values in bindings for _, _, expr in queries)
    )
    results: dict[tuple[int, int], list[tuple[dict[str, str], float]]] = {}
    for i, values in enumerate(bindings):
        for j, (title, ref, expr) in enumerate(queries):
            body = bodies[i * len(queries) + j]
            if body.get("status") != "success":
                problems.append(f"{uid} / {title} / {ref}: {body.get('error')}\n{_substitute(expr, values)}")
                results[i, j] = []
            else:
                results[i, j] = _samples(body)
    # Every query returns data and a number, for every instance of the fleet but the documented gaps.
    for j, (title, ref, expr) in enumerate(queries):
        samples = [sample for i in range(len(bindings)) for sample in results[i, j]]
        where = f"{uid} / {title} / {ref}"
        if not samples:
            problems.append(f"{where}: no data\n{expr}")
            continue
        if not any(math.isfinite(value) for _, value in samples):
            problems.append(f"{where}: only NaN or Inf: {samples[:3]}\n{expr}")
        covered = _covered(bindings, [results[i, j] for i in range(len(bindings))])
        if covered is None:
            continue  # fleet-wide aggregates (counts, the agent's own series): data is enough
        engines, _ = ENGINE_GAPS.get((uid, title, ref), (set(), ""))
        expected = {i for i in SIM_IDS if _engine(i) not in engines}
        if FINDINGS_METRIC in expr:
            expected &= {OVERLOADED}
        if missing := sorted(expected - covered):
            problems.append(f"{where}: no data for {missing}\n{expr}")
    return problems


async def _wait_for_data(base_url: str, deadline: float) -> None:
    """Until every target is scraped, findings fire and pend, and rates have several samples."""
    ready = (
        f"count(count_over_time(up[30s]) >= 4) == {len(SIM_IDS) + 1}"
        " and on () count(perfagent_bottleneck_active) > 0"
        " and on () count(perfagent_bottleneck_pending) > 0"
        " and on () count(perfagent_bottleneck_value) > 0"
        " and on () count(perfagent_history_write_lag_seconds) > 0"
    )
    while time.monotonic() < deadline:
        body = await _query(base_url, ready)
        if body.get("status") == "success" and body["data"]["result"]:
            return
        await asyncio.sleep(0.5)


async def test_every_query_returns_data_on_a_real_prometheus(tmp_path: Path) -> None:
    prometheus_binary()  # skips (or fails under CI) before anything starts
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "fast.yaml").write_text(FAST_RULES, encoding="utf-8")
    port = free_port()
    settings = load_settings(
        db_path=tmp_path / "agent.duckdb",
        polling_interval=1.0,
        demo_fleet="sim",
        port=port,  # the simulated fleet's URLs are built from it
        rules_dir=rules_dir,
    )
    dashboards = [_load(name) for name in DASHBOARD_FILES]
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        workdir = tmp_path / "prometheus"
        workdir.mkdir()
        prometheus = running_prometheus(workdir, _scrape_configs(port))
        # Prometheus starts in a thread: the agent keeps serving on this loop meanwhile.
        base_url = await asyncio.to_thread(prometheus.__enter__)
        try:
            deadline = time.monotonic() + 40
            await _wait_for_data(base_url, deadline)
            while True:
                problems = [p for d in dashboards for p in await _check_dashboard(base_url, d)]
                if not problems or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1)
            assert not problems, "\n\n".join(problems)
        finally:
            await asyncio.to_thread(prometheus.__exit__, None, None, None)
    finally:
        await runner.cleanup()
