"""POST /analysis/backtest: replay rules over a past range of history or Prometheus data."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from perfagent.backtest import (
    DEFAULT_PROMETHEUS_STEP,
    BacktestReport,
    check_rows,
    data_start,
    run_backtest,
)
from perfagent.backtest_sources import load_inline_rules, prometheus_frame, unlabelled
from perfagent.clock import utc_now
from perfagent.context import AGENT, Agent
from perfagent.detect import CompiledRules, compile_rules
from perfagent.errors import NotFoundError, ValidationError
from perfagent.routing import Endpoint, json_response, read_body, time_param
from perfagent.rules import RuleFileError, RuleSet, parse_duration


class BacktestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: str | None = Field(
        None,
        description="Start of the range: a duration ago (`7d`) or ISO 8601. Default 24h; not with `start`.",
    )
    start: str | None = Field(None, description="Start of the range (ISO 8601 or a duration ago).")
    end: str | None = Field(None, description="End of the range (ISO 8601 or a duration ago); default now.")
    instance_id: str | None = Field(None, description="One instance; default every instance with data.")
    source: Literal["history", "prometheus"] = Field(
        "history", description="The agent's stored scrapes, or PromQL on the configured `prometheus_url`."
    )
    step: str | None = Field(
        None,
        description="Time between evaluations, e.g. `15s`, `1m`. Default: the data's scrape interval "
        "(history) or 1m (prometheus).",
    )
    rules: str | dict[str, str] | None = Field(
        None,
        description="Rule YAML on top of the agent's rules (a rule named like one replaces it): one file's text, "
        "or file name -> text. Validated by the agent's loader.",
    )
    rule_names: list[str] | None = Field(None, description="Only these rules; default every rule.")
    limit: int = Field(1000, ge=0, le=100_000, description="Most episodes listed (oldest first).")


def _range(body: BacktestRequest, now: datetime) -> tuple[datetime, datetime]:
    if body.since is not None and body.start is not None:
        raise ValidationError("give `since` or `start`, not both", {"field": "since"})
    start = (
        time_param(body.start, now=now, field="start")
        if body.start is not None
        else time_param(body.since or "24h", now=now, field="since")
    )
    end = time_param(body.end, now=now, field="end") if body.end is not None else now
    if start >= end:
        raise ValidationError("the range is empty: its start is not before its end", {"field": "start"})
    return start, end


def _step(text: str | None) -> timedelta | None:
    if text is None:
        return None
    try:
        step = parse_duration(text)
    except ValueError as exc:
        raise ValidationError(f"Invalid step: {exc}", {"field": "step"}) from None
    if step < timedelta(seconds=1):
        raise ValidationError("Invalid step: at least 1s", {"field": "step"})
    return step


def _rules(agent: Agent, body: BacktestRequest) -> CompiledRules:
    """The agent's rules, with the request's inline files on top, cut down to `rule_names`."""
    ruleset: RuleSet = agent.rules
    if body.rules is not None:
        texts = {"inline.yaml": body.rules} if isinstance(body.rules, str) else body.rules
        paths = [agent.settings.rules_dir] if agent.settings.rules_dir else []
        try:
            ruleset = load_inline_rules(texts, paths)
        except ValueError as exc:
            raise ValidationError(str(exc), {"field": "rules"}) from None
        except RuleFileError as exc:
            raise ValidationError(
                f"invalid rules: {exc.problems[0]}",
                {
                    "field": "rules",
                    "problems": [
                        {"file": str(p.file), "line": p.line, "rule": p.rule, "message": p.message}
                        for p in exc.problems
                    ],
                },
            ) from None
    elif body.rule_names is None:
        return agent.detector.compiled  # compiled once at start-up
    if body.rule_names is not None:
        unknown = [n for n in body.rule_names if ruleset.get(n) is None]
        if unknown:
            raise ValidationError(
                f"no rule named {unknown[0]!r}",
                {"field": "rule_names", "allowed_values": list(ruleset.names)},
            )
        ruleset = RuleSet(tuple(r for r in ruleset if r.name in body.rule_names), ruleset.files)
    return compile_rules(ruleset)


async def backtest(request: web.Request) -> web.Response:
    agent = request.app[AGENT]
    body = await read_body(request, BacktestRequest)
    start, end = _range(body, utc_now())
    step = _step(body.step)
    compiled = await asyncio.to_thread(_rules, agent, body)  # inline files are written and read
    known = await agent.instances()
    if body.instance_id is not None:
        known = [i for i in known if i.id == body.instance_id]
    engines: dict[str, str | None] = {i.id: i.engine.value for i in known}
    notes: list[str] = []
    if body.source == "prometheus":
        if agent.prometheus is None:
            raise ValidationError(
                "source 'prometheus' needs the agent's prometheus_url setting, which is not set; "
                "use source 'history'",
                {"field": "source", "setting": "prometheus_url"},
            )
        if body.instance_id is not None and not known:
            raise NotFoundError(f"no instance {body.instance_id!r}", {"instance_id": body.instance_id})
        skipped = unlabelled(known)
        if skipped:
            notes.append(f"not in Prometheus (no `instance` label): {', '.join(skipped)}")
        queried = [i for i in known if i.id not in skipped]
        step = step or DEFAULT_PROMETHEUS_STEP
        frame = await prometheus_frame(agent.prometheus, queried, compiled, start, end, step)
        ids: list[str] | None = sorted(i.id for i in queried)
    else:
        await agent.history.flush()  # what was scraped a moment ago is part of the range
        since = data_start(compiled, start)
        check_rows(await agent.store.count_scrapes(since, end, body.instance_id))
        frame = await agent.store.recent_scrapes(since, end, compiled.quantities, body.instance_id)
        if body.instance_id is not None and not known and frame.height == 0:
            raise NotFoundError(
                f"no instance {body.instance_id!r} and no history for it", {"instance_id": body.instance_id}
            )
        ids = [body.instance_id] if body.instance_id is not None else None
    report = await asyncio.to_thread(
        run_backtest, compiled, frame, engines, start, end, step=step, source=body.source, instances=ids
    )
    report.notes[:0] = notes
    if len(report.episodes) > body.limit:
        report = report.model_copy(
            update={"episodes": report.episodes[: body.limit], "episodes_truncated": True}
        )
    return json_response(report)


ENDPOINTS = (
    Endpoint(
        "POST",
        "/analysis/backtest",
        backtest,
        "Replay rules over the past",
        "analysis",
        body=BacktestRequest,
        response=BacktestReport,
        errors=(400, 404, 503),
        description="Evaluates the rules (the agent's, optionally with inline rule files on top) at every `step` "
        "of a past range, from an empty state with the agent's `for`/`keep_firing_for` semantics, and reports "
        "per rule how often and how long it would have fired, and every episode. A range without data is a 200 "
        "with zero counts and a note. 400 for invalid rules (`details.problems`: file, line, rule, message), "
        "a range over the backtest limits, or `source: prometheus` without `prometheus_url`; 404 for an "
        "unknown `instance_id` without history; 503 when Prometheus cannot answer.",
    ),
)
