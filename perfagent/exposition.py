"""Vectorized parser for the Prometheus text exposition format (0.0.4) into Polars frames.

One Polars query does the work: the lines form one column, a single anchored regex (one-pass for
the Rust engine, see ``_line_regex``) takes the metric name, value, timestamp, ``le`` label and any
``# TYPE`` header out of every line, the TYPE header is forward-filled onto the samples below it,
and the label pairs are split with ``extract_all`` and ``list.eval``. Python only splits the text
at ``\\n`` (one C call) and, for the report, loops over the skipped lines.

Polars costs about half a millisecond per query however small the input, more than the parse of a
10 kB body. :func:`parse_expositions` therefore parses many bodies (a poll cycle's) in one query,
the lines of all of them in one column with a ``body`` index, and hands back one report per body,
equal to what :func:`parse_exposition_report` gives for that body alone.

Every frame follows :data:`SAMPLE_SCHEMA`: one row per sample, in exposition order.

Differences from ``prometheus_client.parser.text_string_to_metric_families``, on purpose:

* Sample names are kept as exposed. prometheus_client appends ``_total`` to the samples of a
  ``counter`` exposed without it (TGI, dcgm-exporter) and strips it from counter family names.
* Timestamps stay in milliseconds as exposed (``timestamp_ms``); prometheus_client divides them by
  1000. Only integers of at most 18 digits are accepted (|t| < 10**18 ms, 31 million years, so the
  Int64 cast is exact); prometheus_client also takes floats.
* A line that is not a valid sample is skipped (and reported by :func:`parse_exposition_report`);
  prometheus_client raises ``ValueError`` for the whole text.
* ``family``/``type`` come from the most recent ``# TYPE`` line when the sample name is that family
  or the family plus ``_bucket _sum _count _total _created _gsum _gcount _info``, whatever the type;
  otherwise the family is the sample name and the type ``untyped``. prometheus_client instead opens
  a new family for names the type does not allow (``x_created`` after ``# TYPE x counter``) and at
  every ``# HELP``, and calls untyped families ``unknown``. ``# HELP`` lines are ignored here.
* Label names starting with ``__`` are accepted; prometheus_client rejects them as reserved.
* Not supported, the line is skipped as malformed: quoted UTF-8 metric names
  (``{"metric.name"}``), the metric name as a ``__name__`` label, OpenMetrics exemplars.
* Accepted although the format forbids them (only hand-written text has them): empty entries in a
  label set (``{a="1",,b="2"}``, see ``_label_set``) and repeated label names, kept as written in
  ``labels``; ``le``, ``quantile`` and :func:`label` then take the last value, as a dict would.
* Escape sequences other than ``\\\\``, ``\\"`` and ``\\n`` in label values are kept verbatim, as
  prometheus_client does.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import polars as pl

__all__ = [
    "SAMPLE_SCHEMA",
    "ParseReport",
    "SkippedLine",
    "label",
    "parse_exposition",
    "parse_exposition_report",
    "parse_expositions",
]

SAMPLE_SCHEMA: Final = pl.Schema(
    {
        "name": pl.String(),
        "labels": pl.List(pl.Struct({"name": pl.String(), "value": pl.String()})),
        "value": pl.Float64(),
        "timestamp_ms": pl.Int64(),
        "family": pl.String(),
        "type": pl.String(),
        "le": pl.Float64(),
        "quantile": pl.Float64(),
        "line": pl.UInt32(),
    }
)

FAMILY_SUFFIXES: Final = ("_bucket", "_sum", "_count", "_total", "_created", "_gsum", "_gcount", "_info")

REASON_NOT_A_NUMBER: Final = "value is not a number"
REASON_MALFORMED: Final = "malformed sample line"
_MAX_SKIPPED_TEXT: Final = 200


@dataclass(frozen=True, slots=True)
class SkippedLine:
    """A non-comment line that is not a valid sample."""

    line: int  # 1-based line number in the text
    text: str  # the line (without the `\r` of a CRLF), truncated to 200 chars
    reason: str  # REASON_NOT_A_NUMBER or REASON_MALFORMED


@dataclass(frozen=True, slots=True)
class ParseReport:
    """The parsed samples plus the lines that were skipped."""

    samples: pl.DataFrame  # SAMPLE_SCHEMA, one row per sample, in exposition order
    skipped: tuple[SkippedLine, ...]


# --- regular expressions -------------------------------------------------------------------------
#
# The Rust engine has no backtracking or look-around. Its fast way to return capture groups is the
# one-pass DFA, which it uses only when the regex is anchored, has at most 16 capture groups and is
# deterministic: at every point the next byte decides which branch continues. The line regex is
# written that way (about 3x faster than an ambiguous equivalent). That is why the whitespace runs
# below never touch each other, why "name, then blanks or `{`" is spelled out as two branches, and
# why the `le` label is recognised by a small trie instead of an alternation of label names.

_BLANK = r"[ \t]"
_METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
_LABEL_NAME_CHARS = "a-zA-Z0-9_"
_QUOTED_BODY = r'(?:[^"\\]|\\.)*'  # escapes are unescaped later, on the values only
_QUOTED = f'"{_QUOTED_BODY}"'
# What Polars' Float64 cast (and Python's float) accept, minus digit separators and whitespace.
_FLOAT = (
    r"[+-]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?"
    r"|(?i:inf(?:inity)?|nan))"
)
_TIMESTAMP = r"[+-]?[0-9]{1,18}"  # 18 digits always fit an Int64


def _pair_rest(capture: str | None) -> str:
    """`= "value"` after a label name, capturing the value into group `capture` if given."""
    body = f"(?<{capture}>{_QUOTED_BODY})" if capture else _QUOTED_BODY
    return f'{_BLANK}*={_BLANK}*"{body}"{_BLANK}*'


def _char_class_without(chars: str, exclude: str) -> str:
    """The ASCII character class `[chars]` minus the characters in `exclude`."""
    kept = [c for c in map(chr, range(128)) if re.fullmatch(f"[{chars}]", c) and c not in exclude]
    return "[" + "".join(re.escape(c) for c in kept) + "]"


def _label_pair(word: str, capture: str) -> str:
    """A deterministic regex for one `name="value"` pair that captures the value into group
    `capture` when the name is exactly `word` (a trie over `word`'s prefixes)."""

    def node(rest: str, first: bool) -> str:
        # At this point a prefix of `word` has been read; `rest` is what is left of it.
        if not rest:
            return f"(?:[{_LABEL_NAME_CHARS}]+{_pair_rest(None)}|{_pair_rest(capture)})"
        start = "a-zA-Z_" if first else _LABEL_NAME_CHARS
        other = f"{_char_class_without(start, rest[0])}[{_LABEL_NAME_CHARS}]*"
        if not first:  # the name may also end right here
            other = f"(?:{other})?"
        return f"(?:{re.escape(rest[0])}{node(rest[1:], False)}|{other}{_pair_rest(None)})"

    return node(word, True)


def _label_set(tag: str) -> str:
    """The inside of `{...}`. Empty entries (`a="1",,b="2"`) are accepted: rejecting them while
    still allowing a trailing comma would make the regex ambiguous (not one-pass)."""
    first, more = _label_pair("le", f"le_{tag}1"), _label_pair("le", f"le_{tag}2")
    return f"{_BLANK}*(?:{first}(?:,{_BLANK}*(?:{more})?)*)?"


def _line_regex() -> str:
    # Any comment sets `comment`; a TYPE line also sets `type_name` and `type`.
    type_header = rf"{_BLANK}+TYPE{_BLANK}+(?<type_name>{_METRIC_NAME}){_BLANK}+(?<type>[^ \t\r]+)"
    sample = (
        rf"(?<name>{_METRIC_NAME})"
        rf"(?:{_BLANK}+(?:\{{{_label_set('a')}\}}{_BLANK}*)?|\{{{_label_set('b')}\}}{_BLANK}*)"
        rf"(?<value>{_FLOAT})(?:{_BLANK}+(?:(?<ts>{_TIMESTAMP}){_BLANK}*)?)?\r?$"
    )
    return rf"^{_BLANK}*(?:(?<comment>#)(?:{type_header})?|{sample}|(?<blank>)\r?$)"


_LINE_RE: Final = _line_regex()
# A repeated group keeps its last capture, so trying the later pairs first makes the last `le` win.
_LE_GROUPS: Final = ("le_a2", "le_a1", "le_b2", "le_b1")
# A pair inside an already validated sample line; scanning the whole line is safe because neither
# the metric name nor the value/timestamp can contain `="`.
_PAIR_RE: Final = f"{_LABEL_NAME}{_BLANK}*={_BLANK}*{_QUOTED}"

# Python-side, only to word the reason of a skipped line: a valid name and label set followed by
# a token that is not a number (dcgm-exporter's `ERROR - FAILED TO CONVERT TO STRING`).
_PY_PAIR = f"{_LABEL_NAME}{_pair_rest(None)}"
_PY_LABEL_SET = rf"\{{{_BLANK}*(?:{_PY_PAIR}(?:,{_BLANK}*(?:{_PY_PAIR})?)*)?\}}"
_PY_HEAD: Final = re.compile(rf"{_BLANK}*{_METRIC_NAME}(?:{_BLANK}*{_PY_LABEL_SET}{_BLANK}*|{_BLANK}+)(\S+)")
_PY_FLOAT: Final = re.compile(_FLOAT)

# --- the query -----------------------------------------------------------------------------------

_ESCAPES: Final = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
_NAME = pl.col("name")
_TYPE_NAME = pl.col("type_name")
_IS_FAMILY = _NAME.str.starts_with(_TYPE_NAME) & _NAME.str.strip_prefix(_TYPE_NAME).is_in(
    ["", *FAMILY_SUFFIXES]
)

_LINE_MATCH = pl.col("text").str.extract_groups(_LINE_RE).alias("m")
_FORWARD_FILL = [_TYPE_NAME.forward_fill(), pl.col("type").forward_fill()]
# In a batch, a body's first line must not inherit the `# TYPE` of the body before it. This
# sentinel stops the forward fill at line 1 as a null would, and no metric name starts with it (no
# line holds a `\n`), so samples before the body's own first TYPE line stay untyped. Cheaper than
# forward-filling over a window per body.
_NO_TYPE: Final = "\n"
_FORWARD_FILL_PER_BODY = [
    _TYPE_NAME.fill_null(pl.when(pl.col("line") == 1).then(pl.lit(_NO_TYPE))).forward_fill(),
    pl.col("type").forward_fill(),
]
_IS_SAMPLE = _NAME.is_not_null()
# Samples plus skipped lines (neither sample, comment nor blank): the report keeps both in one
# query and splits them afterwards, only when there is something to split.
_IS_SAMPLE_OR_SKIPPED = _IS_SAMPLE | (pl.col("comment").is_null() & pl.col("blank").is_null())


def _labels_expr(unescape: bool) -> pl.Expr:
    # A pair was validated by the line regex: `name`, blanks, `=`, blanks, `"value"`. Everything
    # before the first `"` is ASCII, so its byte offset is also its character offset. Slicing
    # there is about 2x faster than capture groups on every pair.
    pair = pl.element()
    quote = pair.str.find('"', literal=True)
    value = pair.str.slice(quote + 1, pair.str.len_chars() - quote - 2)
    if unescape:
        value = value.str.replace_many(_ESCAPES)
    name = pair.str.slice(0, quote).str.strip_chars_end(" \t=")
    return (
        pl.col("text").str.extract_all(_PAIR_RE).list.eval(pl.struct(name=name, value=value)).alias("labels")
    )


def _sample_exprs(unescape: bool, batched: bool) -> list[pl.Expr]:
    family_type = (
        pl.when(_IS_FAMILY)
        .then(pl.struct(family=_TYPE_NAME, type=pl.col("type")))
        .otherwise(pl.struct(family=_NAME, type=pl.lit("untyped")))
        .alias("family_type")
    )
    return [
        *([pl.col("body")] if batched else []),
        _NAME,
        _labels_expr(unescape),
        pl.col("value").cast(pl.Float64, strict=False),
        pl.col("ts").cast(pl.Int64, strict=False).alias("timestamp_ms"),
        family_type,
        pl.coalesce(_LE_GROUPS).cast(pl.Float64, strict=False).alias("le"),
        pl.lit(None, pl.Float64).alias("quantile"),
        pl.col("line"),
    ]


# Built once: constructing expressions (and compiling their regexes) costs more than parsing a
# small exposition.
_SAMPLES = {
    (unescape, batched): _sample_exprs(unescape, batched)
    for unescape in (False, True)
    for batched in (False, True)
}


def label(name: str) -> pl.Expr:
    """The value of label `name` (String, null when absent) from the `labels` column.

    A label name repeated in one sample (invalid, but kept) yields its last value, like `le`.
    """
    pair = pl.element()
    return (
        pl.col("labels")
        .list.eval(pair.filter(pair.struct.field("name") == name).struct.field("value"))
        .list.last()
    )


_IS_SKIPPED_ROW = _NAME.is_null()
_QUANTILE = label("quantile").cast(pl.Float64, strict=False).alias("quantile")
# The query is small and the data usually is too: the optimizer passes cost more than they save.
_OPTIMIZATIONS: Final = pl.QueryOptFlags.none(projection_pushdown=True)


def _plan(
    lines: pl.LazyFrame, keep: pl.Expr, *, unescape: bool, quantile: bool, batched: bool
) -> pl.LazyFrame:
    """The query over `lines` (columns `line` and `text`, plus `body` when `batched`)."""
    plan = (
        lines.with_columns_seq(_LINE_MATCH)
        .unnest("m")
        .with_columns_seq(_FORWARD_FILL_PER_BODY if batched else _FORWARD_FILL)
        .filter(keep)
        .select_seq(_SAMPLES[unescape, batched])
        .unnest("family_type")
    )
    return plan.with_columns_seq(_QUANTILE) if quantile else plan


def _single(text: str, keep: pl.Expr) -> tuple[list[str], pl.DataFrame]:
    lines = _split_lines(text)
    source = pl.Series("text", lines).to_frame().lazy().with_row_index("line", offset=1)
    # Cheap substring tests on the raw text drop work that cannot matter: no backslash means no
    # escape sequence to undo, no "quantile" means no quantile label. (`quantile` is not taken by
    # the line regex like `le`: with a second trie the regex no longer runs one-pass, measured 5x
    # slower on TGI, and summaries are rare.)
    plan = _plan(source, keep, unescape="\\" in text, quantile="quantile" in text, batched=False)
    return lines, _collect(plan)


def _collect(plan: pl.LazyFrame) -> pl.DataFrame:
    return plan.collect(engine="in-memory", optimizations=_OPTIMIZATIONS)


def _split_lines(text: str) -> list[str]:
    # One C call, no per-line Python; for the usual sizes (up to a few hundred kB) it is cheaper
    # than splitting inside the query. A `\r` before the `\n` is allowed by the regexes.
    return text.split("\n")


def parse_exposition(text: str) -> pl.DataFrame:
    """Parse Prometheus text exposition into a SAMPLE_SCHEMA frame; bad lines are skipped."""
    return _single(text, _IS_SAMPLE)[1]


def parse_exposition_report(text: str) -> ParseReport:
    """Like :func:`parse_exposition`, and also report every skipped line with its reason."""
    lines, frame = _single(text, _IS_SAMPLE_OR_SKIPPED)
    if not frame["name"].null_count():  # the usual case: nothing was skipped
        return ParseReport(samples=frame, skipped=())
    # Only the skipped lines are looped over in Python.
    numbers = frame.filter(_IS_SKIPPED_ROW)["line"].to_list()
    return ParseReport(
        samples=frame.filter(_IS_SAMPLE),
        skipped=tuple(_skipped_line(number, lines[number - 1]) for number in numbers),
    )


def parse_expositions(texts: Sequence[str]) -> list[ParseReport]:
    """Parse many bodies in one query; each report equals :func:`parse_exposition_report` of its body.

    Polars costs about half a millisecond per query however small the input; a poll cycle's bodies
    in one query pay it once instead of once per body.
    """
    if not texts:
        return []
    unescape = any("\\" in text for text in texts)
    quantile = any("quantile" in text for text in texts)
    plan = _plan(
        _batch_lines(texts), _IS_SAMPLE_OR_SKIPPED, unescape=unescape, quantile=quantile, batched=True
    )
    frame = _collect(plan)
    skipped: dict[int, list[SkippedLine]] = {}
    if frame["name"].null_count():
        lines: dict[int, list[str]] = {}  # only the bodies with skipped lines are split in Python
        for i, number in frame.filter(_IS_SKIPPED_ROW).select("body", "line").iter_rows():
            if i not in lines:
                lines[i] = _split_lines(texts[i])
            skipped.setdefault(i, []).append(_skipped_line(number, lines[i][number - 1]))
        frame = frame.filter(_IS_SAMPLE)
    # The rows are in body order, so each body's samples are one slice (no copy) of the frame.
    body, *columns = frame.get_columns()
    bounds = np.searchsorted(body.to_numpy(), np.arange(len(texts) + 1)).tolist()
    samples = pl.DataFrame(columns)
    return [
        ParseReport(samples=samples.slice(start, end - start), skipped=tuple(skipped.get(i, ())))
        for i, (start, end) in enumerate(itertools.pairwise(bounds))
    ]


def _batch_lines(texts: Sequence[str]) -> pl.LazyFrame:
    """Every body's lines as one frame: `body` (0-based), `line` (1-based within the body), `text`.

    Split by Polars, not Python: for a batch that saves making a Python string of every line.
    Like `str.split`, a body of n newlines gives n + 1 lines, so every body has at least one row.
    """
    lines = pl.col("text").str.split("\n")
    return (
        pl.Series("text", texts, pl.String)
        .to_frame()
        .lazy()
        .select_seq(pl.int_range(pl.len(), dtype=pl.UInt32).alias("body"), lines)
        .with_columns_seq(pl.int_ranges(1, pl.col("text").list.len() + 1, dtype=pl.UInt32).alias("line"))
        .explode("line", "text")
    )


def _skipped_line(number: int, text: str) -> SkippedLine:
    text = text.removesuffix("\r")
    head = _PY_HEAD.match(text)
    not_a_number = head is not None and _PY_FLOAT.fullmatch(head.group(1)) is None
    return SkippedLine(
        line=number,
        text=text[:_MAX_SKIPPED_TEXT],
        reason=REASON_NOT_A_NUMBER if not_a_number else REASON_MALFORMED,
    )
