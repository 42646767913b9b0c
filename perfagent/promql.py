"""PromQL text: series selectors parsed and validated (the operator's `discovery` selectors), label
matchers rendered with correct quoting, regex alternations and durations."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Final, Literal

Op = Literal["=", "!=", "=~", "!~"]

_METRIC = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_OP = re.compile(r"=~|!~|!=|=")
_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|`[^`]*`')
_ESCAPES: Final = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
}
_RE2_SPECIAL: Final = frozenset(r"\.+*?()|[]{}^$")


def quote(value: str) -> str:
    """A PromQL double-quoted string literal (Go escapes, which JSON's are a subset of)."""
    return json.dumps(value, ensure_ascii=False)


def escape_regex(value: str) -> str:
    """`value` as a literal inside an RE2 regular expression."""
    return "".join("\\" + ch if ch in _RE2_SPECIAL else ch for ch in value)


def alternation(values: Iterable[str]) -> str:
    """A regex matching exactly the given values (for `=~`), in sorted order so queries are stable."""
    return "|".join(escape_regex(v) for v in sorted(set(values)))


def duration(span: timedelta) -> str:
    """A PromQL duration in whole seconds, at least 1s."""
    return f"{max(round(span.total_seconds()), 1)}s"


@dataclass(frozen=True, slots=True)
class Matcher:
    label: str
    op: Op
    value: str

    def render(self) -> str:
        return f"{self.label}{self.op}{quote(self.value)}"

    def matches_empty(self) -> bool | None:
        """Whether the matcher matches a missing label; None when the regex is beyond Python's `re`."""
        if self.op in ("=", "!="):
            return (self.value == "") == (self.op == "=")
        try:
            hit = re.fullmatch(self.value, "") is not None
        except re.error:
            return None  # RE2-only syntax: Prometheus judges it when queried
        return hit if self.op == "=~" else not hit


@dataclass(frozen=True, slots=True)
class SeriesSelector:
    """`metric{label op "value", ...}`, either part optional, as in PromQL."""

    metric: str | None
    matchers: tuple[Matcher, ...]

    @classmethod
    def parse(cls, text: str) -> SeriesSelector:
        """Parse a series selector; ValueError says what is wrong and at which character."""
        return _Parser(text).selector()

    @property
    def label_matchers(self) -> tuple[Matcher, ...]:
        """The matchers other than on the metric name."""
        return tuple(m for m in self.matchers if m.label != "__name__")

    @property
    def selects_by_name(self) -> bool:
        return self.metric is not None or any(m.label == "__name__" for m in self.matchers)

    def render(self, *extra: Matcher) -> str:
        body = ", ".join(m.render() for m in (*self.matchers, *extra))
        return f"{self.metric or ''}{{{body}}}"

    def __str__(self) -> str:
        return self.render()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"invalid series selector {self.text!r}: {what} at character {self.pos + 1}")

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def take(self, pattern: re.Pattern[str]) -> str | None:
        self.skip()
        found = pattern.match(self.text, self.pos)
        if found is None:
            return None
        self.pos = found.end()
        return found.group()

    def peek(self, literal: str) -> bool:
        self.skip()
        if self.text.startswith(literal, self.pos):
            self.pos += len(literal)
            return True
        return False

    def selector(self) -> SeriesSelector:
        metric = self.take(_METRIC)
        matchers: list[Matcher] = []
        if self.peek("{"):
            while not self.peek("}"):
                matchers.append(self.matcher())
                if not self.peek(","):
                    if not self.peek("}"):
                        raise self.fail("expected ',' or '}'")
                    break
        self.skip()
        if self.pos != len(self.text):
            raise self.fail("unexpected text")
        if metric is None and not matchers:
            raise self.fail("empty selector")
        found = SeriesSelector(metric, tuple(matchers))
        # Prometheus refuses a selector all of whose matchers match the empty string: it would select
        # every series. Say so now rather than at the first query.
        if metric is None and all(m.matches_empty() is True for m in matchers):
            raise ValueError(
                f"invalid series selector {self.text!r}: it needs a metric name or a matcher that does "
                'not match the empty string, e.g. {job="vllm"}'
            )
        return found

    def matcher(self) -> Matcher:
        label = self.take(_LABEL)
        if label is None:
            raise self.fail("expected a label name")
        op = self.take(_OP)
        if op is None:
            raise self.fail(f"expected =, !=, =~ or !~ after {label!r}")
        raw = self.take(_STRING)
        if raw is None:
            raise self.fail(f"expected a quoted value for {label!r}")
        value = _unquote(raw)
        return Matcher(label, op, value)  # type: ignore[arg-type]  # _OP only matches the four ops


def _unquote(raw: str) -> str:
    if raw[0] == "`":
        return raw[1:-1]
    body, out, i = raw[1:-1], [], 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[nxt]
            digits = body[i + 2 : i + 2 + width]
            if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise ValueError(f"bad escape \\{nxt}{digits} in {raw}")
            out.append(chr(int(digits, 16)))
            i += 2 + width
        else:
            raise ValueError(f"unknown escape \\{nxt} in {raw}")
    return "".join(out)
