"""The pure recommender over the optimizations data (`perfagent.optimization_spec`).

`plan` turns bottlenecks, `current_config` and optional metrics into optimizations sorted by priority
then rank, never two setting one flag, plus the ones it skipped and why. No I/O happens here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from perfagent.catalog import CATALOG
from perfagent.models import EngineName
from perfagent.optimization_spec import (
    OPS,
    SEVERITY_ORDER,
    AnyOf,
    Change,
    ConfigCondition,
    EngineOptimizations,
    MetricCondition,
    OptimizationSpec,
    Trigger,
    cli_name,
    coerce,
    config_key,
    load_engine_optimizations,
)
from perfagent.recommend_models import (
    Addressed,
    AliasUse,
    Bottleneck,
    BottleneckType,
    ConfigProblem,
    EstimatedImprovement,
    NormalizedConfig,
    Optimization,
    RecommendRequest,
    RecommendResponse,
    Severity,
    Skipped,
    SkipReason,
)

# ---- current config ---------------------------------------------------------------------------


def normalize_config(spec: EngineOptimizations, config: Mapping[str, Any] | None) -> NormalizedConfig:
    """`config` in the engine's real flag names; a real flag wins over an alias given alongside."""
    values: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    aliases: list[AliasUse] = []
    unrecognized: dict[str, Any] = {}
    invalid: list[ConfigProblem] = []
    notes: list[str] = []
    items = list((config or {}).items())
    # Real flag names first, so an alias given next to its flag never overrides it.
    ordered = sorted(items, key=lambda kv: config_key(str(kv[0])) not in spec.flags)
    for key, raw in ordered:
        norm = config_key(str(key))
        name = norm if norm in spec.flags else spec.alias_index.get(norm)
        if name is None:
            unrecognized[str(key)] = raw
            continue
        if name in given_as:
            reason = f"{name} is also given as {given_as[name]!r}; that value is used"
            invalid.append(ConfigProblem(key=str(key), value=raw, reason=reason))
            continue
        value, problem, note = coerce(spec.flags[name], raw)
        if problem:
            invalid.append(ConfigProblem(key=str(key), value=raw, reason=problem))
            continue
        given_as[name] = str(key)
        values[name] = value
        if note:
            notes.append(f"{name}: {note}")
        if norm != name:
            aliases.append(
                AliasUse(
                    given=str(key),
                    flag=name,
                    cli=cli_name(name),
                    note=f"documented alias of {spec.engine.value} {cli_name(name)}",
                )
            )
    return NormalizedConfig(
        values=values, aliases=aliases, unrecognized=unrecognized, invalid=invalid, notes=notes
    )


# ---- recommending -----------------------------------------------------------------------------

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_TTFT = re.compile(r"\b(ttft|first token|time to first token|queue time|prefill)\b")
_ITL = re.compile(r"\b(itl|tpot|inter token|intertoken|time per output token|per output token|decode)\b")


def latency_aspect(bottleneck: Bottleneck) -> Literal["ttft", "itl"] | None:
    """Which latency a HIGH_LATENCY bottleneck is about, from its metric, rule, then description."""
    for texts in ((bottleneck.metric_name, bottleneck.rule), (bottleneck.description,)):
        text = " ".join(_CAMEL.sub(" ", t) for t in texts if t).lower()
        text = re.sub(r"[_\-:./]+", " ", text)
        ttft, itl = bool(_TTFT.search(text)), bool(_ITL.search(text))
        if ttft != itl:
            return "ttft" if ttft else "itl"
    return None


def _facts(metrics: Mapping[str, float | None], bottlenecks: Sequence[Bottleneck]) -> dict[str, float]:
    facts = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    for b in bottlenecks:  # a full finding carries its own measurement
        name, value = b.metric_name, b.current_value
        if name is not None and name in CATALOG and value is not None and math.isfinite(value):
            facts.setdefault(name, value)
    # A QUEUE_BUILDUP bottleneck means requests wait, even when no count came with it.
    if "requests_waiting" not in facts and any(b.type is BottleneckType.QUEUE_BUILDUP for b in bottlenecks):
        facts["requests_waiting"] = 1.0
    total, used = facts.get("gpu_memory_total_bytes"), facts.get("gpu_memory_used_bytes")
    if total is not None and used is not None:
        facts["gpu_memory_free_bytes"] = total - used
    return facts


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


def _fmt(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


@dataclass(frozen=True, slots=True)
class _Context:
    spec: EngineOptimizations
    values: Mapping[str, Any]  # normalized current_config
    facts: Mapping[str, float]

    def base(self, name: str) -> tuple[Any, Literal["current_config", "default", "unknown"]]:
        """A flag's value in force: from current_config, else the documented default."""
        if self.values.get(name) is not None:
            return self.values[name], "current_config"
        default = self.spec.flags[name].default
        return (default, "default") if default is not None else (None, "unknown")


@dataclass(frozen=True, slots=True)
class _Failure:
    reason: SkipReason
    detail: str


@dataclass(slots=True)
class _Candidate:
    spec: OptimizationSpec
    changes: dict[str, Any]
    old: dict[str, Any]
    notes: list[str]
    addresses: list[Bottleneck]
    description: str

    @property
    def priority(self) -> Severity:
        top = max(SEVERITY_ORDER.index(b.severity) for b in self.addresses)
        return SEVERITY_ORDER[max(0, top + self.spec.priority_shift)]


def _truth(cond: MetricCondition | ConfigCondition | AnyOf, ctx: _Context) -> tuple[bool, bool]:
    """(holds, an input was missing)."""
    if isinstance(cond, AnyOf):
        results = [_truth(leaf, ctx) for leaf in cond.any]
        holds = any(h for h, _ in results)
        return holds, not holds and any(m for _, m in results)
    if isinstance(cond, ConfigCondition):
        value = ctx.values.get(cond.config)
        if cond.is_set is not None:
            return (value is not None) == cond.is_set, False
        return any(_same(value, v) for v in cond.in_ or ()), False
    metric = ctx.facts.get(cond.metric)
    rhs = cond.value
    if cond.flag is not None:
        base, _ = ctx.base(cond.flag)
        rhs = None if base is None else float(base) * cond.factor
    if metric is None or rhs is None:
        return cond.if_missing, True
    return OPS[cond.op](metric, rhs), False


def _compute(name: str, change: Change, ctx: _Context) -> tuple[Any, Any, str | None] | _Failure:
    """(new value, value replaced, note on where the old value came from) or why it cannot apply."""
    flag = ctx.spec.flags[name]
    base, source = ctx.base(name)
    note = None
    if source == "default":
        verb = "assumed" if change.literal else "computed from"
        note = f"{name}: not in current_config; {verb} the engine default {_fmt(base)}"
        note += f" ({flag.default_note})" if flag.default_note else ""
    elif source == "unknown" and flag.default_note and name not in ctx.values:
        # Given as null in current_config means known to be unset; only an absent key is unknown.
        note = f"{name}: current value unknown ({flag.default_note})"
    needs_base = not change.literal or change.direction is not None
    if needs_base and base is None:
        why = flag.default_note or "no documented default"
        return _Failure(SkipReason.MISSING_INPUT, f"needs the current {name} in current_config ({why})")
    if needs_base and source == "default" and flag.default_varies and change.direction == "raise":
        return _Failure(
            SkipReason.MISSING_INPUT,
            f"the default {name} varies ({flag.default_note}); "
            "raising it needs its current value in current_config",
        )
    if change.literal:
        new, _, _ = coerce(flag, change.set)
    else:
        value = float(base) * (1.0 if change.multiply is None else change.multiply) + (change.add or 0.0)
        if change.at_least is not None:
            value = max(value, change.at_least)
        if change.at_most is not None:
            value = min(value, change.at_most)
        digits = 2 if change.round is None else change.round
        new = round(value) if flag.type == "int" else round(value, digits)
    if change.direction is not None:
        moved = new > base if change.direction == "raise" else new < base
        if not moved:
            return _Failure(
                SkipReason.AT_BOUND,
                f"{name} is {_fmt(base)} ({source.replace('_', ' ')}); "
                f"it would {change.direction} to {_fmt(new)}",
            )
    in_force = source == "current_config" or (source == "default" and not flag.default_varies)
    if in_force and _same(base, new):
        return _Failure(
            SkipReason.ALREADY_IN_FORCE, f"{name} is already {_fmt(new)} ({source.replace('_', ' ')})"
        )
    return new, base, note


def _evaluate(opt: OptimizationSpec, ctx: _Context, matched: list[Bottleneck]) -> _Candidate | Skipped:
    addressed = [_addressed(b) for b in matched]

    def skip(reason: SkipReason, detail: str) -> Skipped:
        return Skipped(
            id=_ident(ctx, opt.id), type=opt.type, reason=reason, detail=detail, addresses=addressed
        )

    for cond in opt.skip_if:
        holds, _ = _truth(cond, ctx)
        if holds:
            configured = isinstance(cond, ConfigCondition) or (
                isinstance(cond, AnyOf) and all(isinstance(c, ConfigCondition) for c in cond.any)
            )
            return skip(
                SkipReason.ALREADY_CONFIGURED if configured else SkipReason.CONDITION_NOT_MET, cond.reason
            )
    for cond in opt.require:
        holds, missing = _truth(cond, ctx)
        if not holds:
            return skip(SkipReason.MISSING_INPUT if missing else SkipReason.CONDITION_NOT_MET, cond.reason)
    changes: dict[str, Any] = {}
    old: dict[str, Any] = {}
    notes: list[str] = []
    failures: list[_Failure] = []
    for name, change in opt.changes.items():
        result = _compute(name, change, ctx)
        if isinstance(result, _Failure):
            if result.reason is not SkipReason.ALREADY_IN_FORCE and not change.optional:
                return skip(result.reason, result.detail)
            failures.append(result)
            if change.optional:
                notes.append(f"{name} left as is: {result.detail}")
            continue
        changes[name], old[name], note = result
        if note:
            notes.append(note)
    if not changes and not opt.deployment:
        first = failures[0]
        return skip(first.reason, "; ".join(f.detail for f in failures))
    rendered = {"new": {k: _fmt(v) for k, v in changes.items()}, "old": {k: _fmt(v) for k, v in old.items()}}
    return _Candidate(
        spec=opt,
        changes=changes,
        old=old,
        notes=notes,
        addresses=list(matched),
        description=opt.description.strip().format(**rendered),
    )


def _ident(ctx: _Context, opt_id: str) -> str:
    return f"{ctx.spec.engine.value}.{opt_id}"


def _addressed(b: Bottleneck) -> Addressed:
    return Addressed(
        type=b.type,
        severity=b.severity,
        description=b.description,
        rule=b.rule,
        metric_name=b.metric_name,
        current_value=b.current_value,
        threshold_value=b.threshold_value,
    )


def _matches(triggers: Iterable[Trigger], bottlenecks: Sequence[Bottleneck]) -> list[Bottleneck]:
    out = []
    for b in bottlenecks:
        for t in triggers:
            if (
                t.bottleneck is b.type
                and SEVERITY_ORDER.index(b.severity) >= SEVERITY_ORDER.index(t.min_severity)
                and (t.latency is None or latency_aspect(b) in (t.latency, None))
            ):
                out.append(b)
                break
    return out


def cli_args(spec: EngineOptimizations, changes: Mapping[str, Any]) -> list[str]:
    """Command-line arguments setting `changes` (real flag keys to values)."""
    args: list[str] = []
    for name, value in changes.items():
        flag = spec.flags[name]
        if flag.type == "bool":
            args.append(cli_name(name) if value else str(flag.negation))
        else:
            args += [cli_name(name), _fmt(value)]
    return args


def _render(c: _Candidate, spec: EngineOptimizations) -> Optimization:
    improvement = c.spec.estimated_improvement
    return Optimization(
        type=c.spec.type,
        priority=c.priority,
        description=c.description,
        estimated_improvement=EstimatedImprovement.model_validate(improvement.model_dump()),
        config_changes=dict(c.changes),
        risks=list(c.spec.risks),
        id=f"{spec.engine.value}.{c.spec.id}",
        engine=spec.engine,
        rank=c.spec.rank,
        cli_args=cli_args(spec, c.changes),
        current_values={k: c.old[k] for k in c.changes},
        deployment_changes=dict(c.spec.deployment),
        requires_restart=bool(c.changes),
        requires_new_weights=c.spec.requires_new_weights,
        auto_applicable=c.spec.auto_applicable,
        addresses=[_addressed(b) for b in c.addresses],
        notes=list(c.notes),
    )


def _order(c: _Candidate) -> tuple[int, int, str]:
    return (-SEVERITY_ORDER.index(c.priority), c.spec.rank, c.spec.id)


def _deduplicate(candidates: list[_Candidate], ctx: _Context) -> tuple[list[_Candidate], list[Skipped]]:
    """Keep candidates in priority/rank order, each flag set once.

    A later candidate setting a taken flag to another value loses that change if it is optional, else
    it is skipped as a conflict; one setting only taken flags to the same values is a duplicate, and
    its bottlenecks join the optimization already making those changes.
    """
    kept: list[_Candidate] = []
    skipped: list[Skipped] = []
    taken: dict[str, tuple[Any, _Candidate]] = {}
    for c in sorted(candidates, key=_order):
        keys = {**c.changes, **{f"deployment.{k}": v for k, v in c.spec.deployment.items()}}
        conflicts = [k for k, v in keys.items() if k in taken and not _same(taken[k][0], v)]
        addresses = [_addressed(b) for b in c.addresses]
        change_specs = c.spec.changes
        optional = all(k in change_specs and change_specs[k].optional for k in conflicts)
        if conflicts and optional and len(conflicts) < len(keys):
            # Only optional changes collide: drop them, keep the rest of the optimization.
            for k in conflicts:
                c.notes.append(
                    f"{k} left as is: {_ident(ctx, taken[k][1].spec.id)} sets it to {_fmt(taken[k][0])}"
                )
                c.changes.pop(k)
                keys.pop(k)
            conflicts = []
        if conflicts:
            detail = "; ".join(
                f"{k}={_fmt(keys[k])} conflicts with {_ident(ctx, taken[k][1].spec.id)}, "
                f"which sets {k}={_fmt(taken[k][0])}"
                for k in conflicts
            )
            skipped.append(
                Skipped(
                    id=_ident(ctx, c.spec.id),
                    type=c.spec.type,
                    reason=SkipReason.CONFLICT,
                    detail=detail,
                    config_changes=dict(c.changes),
                    addresses=addresses,
                )
            )
            continue
        shared = [k for k in keys if k in taken]
        if shared and len(shared) == len(keys):
            winner = taken[shared[0]][1]
            winner.addresses += [b for b in c.addresses if b not in winner.addresses]
            skipped.append(
                Skipped(
                    id=_ident(ctx, c.spec.id),
                    type=c.spec.type,
                    reason=SkipReason.DUPLICATE,
                    detail=f"{_ident(ctx, winner.spec.id)} already makes the same changes; its bottlenecks "
                    "were added to that one",
                    config_changes=dict(c.changes),
                    addresses=addresses,
                )
            )
            continue
        for k in shared:
            c.notes.append(f"{k}={_fmt(keys[k])} is already proposed by {_ident(ctx, taken[k][1].spec.id)}")
            c.changes.pop(k, None)
        for k, v in keys.items():
            taken.setdefault(k, (v, c))
        kept.append(c)
    return sorted(kept, key=_order), skipped


@dataclass(frozen=True, slots=True)
class Plan:
    """The recommender's full answer."""

    optimizations: tuple[Optimization, ...]
    skipped: tuple[Skipped, ...]
    normalized_config: NormalizedConfig
    assumes: str
    facts: Mapping[str, float] = field(default_factory=dict)  # metrics as used, derived ones included


def plan(
    engine: EngineName | str,
    bottlenecks: Iterable[Bottleneck | Mapping[str, Any]],
    current_config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float | None] | None = None,
) -> Plan:
    """Optimizations for `bottlenecks` on `engine`, given its current config and optional metrics."""
    spec = load_engine_optimizations(EngineName(engine).value)
    found = [b if isinstance(b, Bottleneck) else Bottleneck.model_validate(b) for b in bottlenecks]
    normalized = normalize_config(spec, current_config)
    ctx = _Context(spec=spec, values=normalized.values, facts=_facts(metrics or {}, found))
    skipped: list[Skipped] = []
    for unavailable in spec.unavailable:
        matched = _matches(unavailable.triggers, found)
        if matched:
            skipped.append(
                Skipped(
                    id=_ident(ctx, unavailable.id),
                    type=unavailable.type,
                    reason=SkipReason.NOT_APPLICABLE,
                    detail=unavailable.reason.strip(),
                    addresses=[_addressed(b) for b in matched],
                )
            )
    candidates: list[_Candidate] = []
    for opt in spec.optimizations:
        matched = _matches(opt.triggers, found)
        if not matched:
            continue
        outcome = _evaluate(opt, ctx, matched)
        if isinstance(outcome, Skipped):
            skipped.append(outcome)
        else:
            candidates.append(outcome)
    kept, dropped = _deduplicate(candidates, ctx)
    return Plan(
        optimizations=tuple(_render(c, spec) for c in kept),
        skipped=tuple(skipped + dropped),
        normalized_config=normalized,
        assumes=spec.assumes.strip(),
        facts=dict(ctx.facts),
    )


def recommend(
    engine: EngineName | str,
    bottlenecks: Iterable[Bottleneck | Mapping[str, Any]],
    current_config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float | None] | None = None,
) -> list[Optimization]:
    """The optimizations of `plan`, sorted by priority then rank."""
    return list(plan(engine, bottlenecks, current_config, metrics).optimizations)


def build_response(request: RecommendRequest, now: datetime) -> RecommendResponse:
    """The POST /optimization/recommend answer to `request` at `now`."""
    result = plan(request.instance_type, request.bottlenecks, request.current_config, request.metrics)
    return RecommendResponse(
        instance_id=request.instance_id,
        optimizations=list(result.optimizations),
        recommendation_timestamp=now,
        engine=request.instance_type,
        assumes=result.assumes,
        normalized_config=result.normalized_config,
        skipped=list(result.skipped),
    )
