"""SLO files: latency objectives on engine histograms, validated and loaded like rule files.

An SLO reads "`objective` of the requests see `histogram` at or under `threshold`, over `period`", and
alerts when the error budget burns too fast over a long and a short window at once: the multiwindow,
multi-burn-rate alerts of the Google SRE workbook (ch. 5, "Alerting on SLOs"). Good requests are the
cumulative bucket at `le = threshold`, so the threshold must be a bucket edge of the histogram on every
engine version perfagent knows (perfagent/engines/buckets.yaml). Every problem names the file, the SLO
and the line, as the rule loader does (its YAML location helpers are reused).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Final, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError

from perfagent.buckets import bucket_data, common_edges, matching_edge, nearest
from perfagent.catalog import CATALOG
from perfagent.enginemap import HistogramSource, HistogramSumSource, load_engine_map
from perfagent.errors import FileProblemsError
from perfagent.models import EngineName
from perfagent.rules import (
    BUILTIN_RULES_DIR,
    Duration,
    Severity,
    child_node,
    format_duration,
    line_of,
    node_line,
    read_yaml_file,
    validation_messages,
    yaml_files,
)

# Built-in SLOs; a user's live in `slos/` inside their rules directory. The rule loader reads only the
# files directly in a directory, so it never reads these.
SLO_DIR_NAME: Final = "slos"
BUILTIN_SLOS_DIR: Final[Path] = BUILTIN_RULES_DIR / SLO_DIR_NAME

# Catalog quantities backed by a latency histogram on some engine.
LATENCY_HISTOGRAMS: Final[tuple[str, ...]] = (
    "ttft_seconds",
    "itl_seconds",
    "e2e_latency_seconds",
    "queue_time_seconds",
)

DEFAULT_RECOMMENDATION: Final = (
    "The error budget is burning faster than the SLO allows: find what slows these requests (queue "
    "build-up, KV-cache pressure, long prompts) in this instance's other findings, and add capacity or "
    "shed load before the budget is spent."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _seconds(value: float) -> str:
    return f"{value:.6g}"


class AlertPair(_Strict):
    """Fire when the burn rate exceeds `factor` over both the long and the short window."""

    long: Duration
    short: Duration
    factor: FiniteFloat = Field(gt=0)
    severity: Severity

    @model_validator(mode="after")
    def _windows(self) -> Self:
        if self.short <= timedelta(0):
            raise ValueError("short: the window must be longer than 0s")
        if self.short >= self.long:
            raise ValueError(
                f"short: {format_duration(self.short)} must be shorter than long "
                f"({format_duration(self.long)}): the short window confirms the long one still burns"
            )
        return self


# Google SRE workbook, ch. 5 ("Alerting on SLOs", multiwindow, multi-burn-rate alerts), for a 30-day
# SLO: 2% of the budget spent in 1 h (x14.4) or 5% in 6 h (x6) pages, 10% in 3 d (x1) opens a ticket;
# the 10%-in-a-day ticket (1d/2h, x3) completes the set as SLO generators (e.g. Sloth) ship it. The
# short window is 1/12 of the long one. Pages map to CRITICAL (budget gone in ~2 days) and HIGH
# (~5 days), tickets to MEDIUM (~10 days) and LOW (on course to spend exactly the budget).
DEFAULT_ALERTS: Final[tuple[AlertPair, ...]] = (
    AlertPair(long=timedelta(hours=1), short=timedelta(minutes=5), factor=14.4, severity=Severity.CRITICAL),
    AlertPair(long=timedelta(hours=6), short=timedelta(minutes=30), factor=6.0, severity=Severity.HIGH),
    AlertPair(long=timedelta(days=1), short=timedelta(hours=2), factor=3.0, severity=Severity.MEDIUM),
    AlertPair(long=timedelta(days=3), short=timedelta(hours=6), factor=1.0, severity=Severity.LOW),
)

SloName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]*$", max_length=128)]


@dataclass(frozen=True, slots=True)
class Target:
    """What an SLO reads on one engine."""

    engine: EngineName
    metrics: tuple[str, ...]  # the engine's histograms for it, in engine-map order: the first present wins
    edge: float  # the exact bucket edge (`le`) the threshold names


def _close(word: str, choices: Sequence[str]) -> str:
    # difflib misses a short prefix (`ttft` for `ttft_seconds`); a prefix is the likelier slip.
    found = difflib.get_close_matches(word, sorted(choices), n=1) or [
        c for c in choices if c.startswith(word)
    ]
    return f" (did you mean '{found[0]}'?)" if found else ""


def _engine_histograms(engine: EngineName) -> tuple[str, ...]:
    """The histograms an engine map reads for the latency quantities (stored with every scrape)."""
    emap = load_engine_map(engine.value)
    return tuple(
        source.metric
        for quantity in LATENCY_HISTOGRAMS
        if quantity in emap.quantities
        for source in emap.quantities[quantity].sources
        if isinstance(source, HistogramSource) and not source.where and not source.where_not
    )


def _metrics(engine: EngineName, histogram: str) -> tuple[str, ...]:
    """The histograms `histogram` (a catalog quantity or an exposed name) stands for on `engine`."""
    if histogram in CATALOG:
        if histogram not in LATENCY_HISTOGRAMS:
            raise ValueError(
                f"histogram: '{histogram}' is not a latency histogram; use one of "
                f"{', '.join(LATENCY_HISTOGRAMS)} (a quantile such as ttft_seconds_p99 is computed from "
                "its histogram, ttft_seconds)"
            )
        qmap = load_engine_map(engine.value).quantities.get(histogram)
        sources = qmap.sources if qmap is not None else ()
        metrics = tuple(
            s.metric for s in sources if isinstance(s, HistogramSource) and not s.where and not s.where_not
        )
        if not metrics and any(isinstance(s, HistogramSumSource) for s in sources):
            raise ValueError(
                f"histogram: {engine.value} has no {histogram} histogram: perfagent approximates it by "
                "adding other histograms' means and quantiles (ENGINES.md), which counts no request under a "
                "threshold. Give this engine an SLO of its own on queue_time_seconds or e2e_latency_seconds"
            )
        if not metrics:
            raise ValueError(f"histogram: {engine.value} exports no {histogram} histogram")
        return metrics
    if histogram in _engine_histograms(engine):
        return (histogram,)
    owners = [e.value for e in EngineName if histogram in _engine_histograms(e)]
    if owners:
        raise ValueError(
            f"histogram: '{histogram}' is a {owners[0]} histogram, not one of {engine.value}: give each "
            "engine's histogram in an SLO of its own, or a catalog quantity such as ttft_seconds"
        )
    every = [*LATENCY_HISTOGRAMS, *(m for e in EngineName for m in _engine_histograms(e))]
    raise ValueError(
        f"histogram: unknown histogram '{histogram}'{_close(histogram, every)}; give a latency quantity "
        f"({', '.join(LATENCY_HISTOGRAMS)}) or a histogram an engine map reads (e.g. "
        "vllm:time_to_first_token_seconds)"
    )


def resolve_targets(engines: Sequence[EngineName], histogram: str, threshold: float) -> tuple[Target, ...]:
    """Each engine's histograms and the exact edge `threshold` names; ValueError when it names none."""
    data = bucket_data()
    targets = []
    for engine in engines:
        metrics = _metrics(engine, histogram)
        layouts = tuple(layout for m in metrics for layout in data.layouts_of(engine.value, m))
        unknown = [m for m in metrics if not data.layouts_of(engine.value, m)]
        if unknown:
            raise ValueError(
                f"histogram: no bucket layout is recorded for {unknown[0]} (perfagent/engines/buckets.yaml)"
            )
        missing = [layout for layout in layouts if matching_edge(threshold, layout.bounds) is None]
        if missing:
            shared = common_edges(layouts)
            close = " and ".join(f"{_seconds(e)} s" for e in nearest(threshold, shared))
            having = [layout.name for layout in layouts if layout not in missing]
            raise ValueError(
                f"threshold: {_seconds(threshold)} s is not a bucket edge of {engine.value}'s {histogram} "
                f"histogram in {missing[0].versions} (layout {missing[0].name})"
                + (f", though it is one in {', '.join(having)}" if having else "")
                + ", so requests at or under it cannot be counted; "
                + (
                    f"nearest edges on every {engine.value} version: {close}"
                    if close
                    else "no edge is shared"
                )
            )
        edge = matching_edge(threshold, layouts[0].bounds)
        assert edge is not None  # checked above
        targets.append(Target(engine, metrics, edge))
    return tuple(targets)


class Slo(_Strict):
    """One SLO. Field order matters: validators read the fields declared before them."""

    name: SloName
    description: str = ""
    engines: tuple[EngineName, ...] = Field(min_length=1)
    histogram: Annotated[str, StringConstraints(min_length=1)]
    threshold: FiniteFloat = Field(gt=0)
    objective: FiniteFloat
    period: Duration = timedelta(days=30)
    alerts: tuple[AlertPair, ...] = DEFAULT_ALERTS
    labels: dict[str, str] = Field(default_factory=dict)
    recommendation: Annotated[str, StringConstraints(min_length=1)] = DEFAULT_RECOMMENDATION

    @field_validator("engines")
    @classmethod
    def _unique_engines(cls, engines: tuple[EngineName, ...]) -> tuple[EngineName, ...]:
        if len(set(engines)) != len(engines):
            raise ValueError("an engine is listed twice")
        return engines

    @field_validator("objective")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if 1 < value <= 100:
            raise ValueError(f"{value} is not a fraction: write {value / 100:g} for {value:g}%")
        if not 0 < value < 1:
            raise ValueError(f"{value} must lie strictly between 0 and 1 (0.95 means 95% of requests)")
        return value

    @field_validator("period")
    @classmethod
    def _positive_period(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("the period must be longer than 0s")
        return value

    @field_validator("alerts")
    @classmethod
    def _alerts(cls, alerts: tuple[AlertPair, ...], info: ValidationInfo) -> tuple[AlertPair, ...]:
        if not alerts:
            raise ValueError("give at least one pair, or omit `alerts` for the SRE workbook's four")
        seen: set[tuple[timedelta, timedelta]] = set()
        for i, pair in enumerate(alerts):
            if (pair.long, pair.short) in seen:
                raise ValueError(
                    f"{i}: the pair {format_duration(pair.long)}/{format_duration(pair.short)} is given twice"
                )
            seen.add((pair.long, pair.short))
            objective = info.data.get("objective")
            if objective is not None and pair.factor >= 1 / (1 - objective):
                raise ValueError(f"{i}: {_unreachable(pair, objective)}")
        return alerts

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if "alerts" not in self.model_fields_set:
            for pair in self.alerts:
                if pair.factor >= 1 / (1 - self.objective):
                    raise ValueError(
                        f"objective: {_unreachable(pair, self.objective)}; with the default alert pairs the "
                        "objective must exceed 0.9306, or give `alerts:`"
                    )
        longest = max(pair.long for pair in self.alerts)
        if self.period < longest:
            raise ValueError(
                f"period: {format_duration(self.period)} is shorter than the longest alert window "
                f"({format_duration(longest)})"
            )
        resolve_targets(self.engines, self.histogram, self.threshold)
        return self


def _unreachable(pair: AlertPair, objective: float) -> str:
    return (
        f"the {pair.severity.value} pair's factor {pair.factor:g} can never be reached: with objective "
        f"{objective:g} the burn rate is at most {1 / (1 - objective):.4g} (every request too slow)"
    )


class SloFile(_Strict):
    slos: list[Any] = Field(default_factory=list)


# --- loading ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SloProblem:
    """One thing wrong in an SLO file, printed as `file:line: slo 'x': message`."""

    file: Path
    line: int
    message: str
    slo: str | None = None

    def __str__(self) -> str:
        where = f"slo '{self.slo}': " if self.slo else ""
        return f"{self.file}:{self.line}: {where}{self.message}"


class SloFileError(FileProblemsError[SloProblem]):
    """One or more SLO files are invalid; `problems` lists every one found."""


@dataclass(frozen=True, slots=True)
class LoadedSlo:
    """A validated SLO, where it came from, and what it reads on each engine."""

    slo: Slo
    file: Path
    line: int
    builtin: bool
    targets: tuple[Target, ...]

    @property
    def name(self) -> str:
        return self.slo.name

    @property
    def rule(self) -> str:
        """The name its findings carry, apart from every rule's (rule names have no `slo:` prefix)."""
        return f"slo:{self.slo.name}"


@dataclass(frozen=True, slots=True)
class SloSet:
    """The SLOs in effect, built-ins first, each name once."""

    slos: tuple[LoadedSlo, ...] = ()
    files: tuple[Path, ...] = field(default=())

    def __iter__(self) -> Iterator[LoadedSlo]:
        return iter(self.slos)

    def __len__(self) -> int:
        return len(self.slos)

    def get(self, name: str) -> LoadedSlo | None:
        return next((s for s in self.slos if s.name == name), None)

    @property
    def span(self) -> timedelta:
        """The longest stretch of history any SLO reads (its period; alert windows are shorter)."""
        return max((s.slo.period for s in self.slos), default=timedelta(0))


def load_slo_file(path: Path, *, builtin: bool = False) -> tuple[list[LoadedSlo], list[SloProblem]]:
    """Validate one file: its SLOs, and every problem found."""
    root, data, unreadable = read_yaml_file(path)
    if unreadable is not None:
        return [], [SloProblem(path, *unreadable)]
    if root is None or data is None:
        return [], []
    try:
        SloFile.model_validate(data)
    except PydanticValidationError as exc:
        return [], [
            SloProblem(path, line_of(root, loc), msg) for loc, msg in validation_messages(exc, SloFile)
        ]
    loaded: list[LoadedSlo] = []
    problems: list[SloProblem] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(data.get("slos") or []):
        node = child_node(root, "slos", i) or root
        name = raw.get("name") if isinstance(raw, dict) else None
        name = name if isinstance(name, str) else f"#{i + 1}"
        try:
            slo = Slo.model_validate(raw)
        except PydanticValidationError as exc:
            problems.extend(
                SloProblem(path, line_of(node, loc), msg, name)
                for loc, msg in validation_messages(exc, Slo, node)
            )
            continue
        if slo.name in seen:
            problems.append(
                SloProblem(
                    path,
                    node_line(node),
                    f"duplicate SLO name (first defined at line {seen[slo.name]})",
                    slo.name,
                )
            )
            continue
        seen[slo.name] = node_line(node)
        targets = resolve_targets(slo.engines, slo.histogram, slo.threshold)
        loaded.append(LoadedSlo(slo, path, node_line(node), builtin, targets))
    return loaded, sorted(problems, key=lambda p: p.line)


def load_slos(paths: Sequence[Path] = (), *, builtin: bool = True) -> SloSet:
    """The built-in SLOs (`rules/slos/`) plus the SLO files or directories in `paths`.

    An SLO named like an earlier one replaces it (a user's copy of a built-in SLO changes it); two of
    the same name within one path are an error. Raises SloFileError listing every problem.
    """
    sources: list[tuple[Path, bool]] = [(BUILTIN_SLOS_DIR, True)] if builtin else []
    sources.extend((Path(p), False) for p in paths)
    problems: list[SloProblem] = []
    by_name: dict[str, LoadedSlo] = {}
    files: list[Path] = []
    for source, is_builtin in sources:
        if not source.exists():
            problems.append(SloProblem(source, 1, "no such file or directory"))
            continue
        in_source: dict[str, LoadedSlo] = {}
        for path in yaml_files(source):
            files.append(path)
            loaded, found = load_slo_file(path, builtin=is_builtin)
            problems.extend(found)
            for ls in loaded:
                if ls.name in in_source:
                    first = in_source[ls.name]
                    problems.append(
                        SloProblem(
                            path, ls.line, f"duplicate SLO name (also in {first.file}:{first.line})", ls.name
                        )
                    )
                    continue
                in_source[ls.name] = ls
        by_name.update(in_source)
    if problems:
        raise SloFileError(problems)
    return SloSet(tuple(by_name.values()), tuple(files))
