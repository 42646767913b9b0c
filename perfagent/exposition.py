"""Vectorized parser of the Prometheus text exposition format into one canonical Polars frame.

Differences from `prometheus_client.parser`, on purpose:
- Sample names are kept as exposed: prometheus_client appends `_total` to counters exposed without
  it (TGI's `tgi_request_count`); we do not, so names match what the engine documents.
- Timestamps are kept in milliseconds as exposed (text format 0.0.4); prometheus_client turns them
  into seconds.
- A bad line is skipped and reported (`ParseReport.skipped`), not fatal: dcgm-exporter prints
  `ERROR - FAILED TO CONVERT TO STRING` as a value for some fields on MIG, and one such line must not
  hide the rest of the scrape.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

LABEL_STRUCT = pl.Struct({"name": pl.String, "value": pl.String})

SAMPLE_SCHEMA = pl.Schema(
    {  # type: ignore[arg-type]  # polars' stubs reject a dict literal mixing DataType instances
        "name": pl.String,
        "labels": pl.List(LABEL_STRUCT),
        "value": pl.Float64,
        "timestamp_ms": pl.Int64,
        "family": pl.String,
        "type": pl.String,
        "le": pl.Float64,
        "quantile": pl.Float64,
        "line": pl.UInt32,
    }
)

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
# Label values may hold `}`, `,`, `=` and escaped quotes, so the label block is a run of quoted
# strings and non-quote characters; the Rust regex engine matches this in linear time.
_SAMPLE = rf'^\s*({_NAME})\s*(?:\{{((?:[^"}}]|"(?:[^"\\]|\\.)*")*)\}})?\s*(.*?)\s*$'
_PAIR = r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"'
_TYPE = rf"^#\s*TYPE\s+({_NAME})\s+(\S+)"
_NUMBER = (
    r"^[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[Nn][Aa][Nn]|[Ii][Nn][Ff](?:[Ii][Nn][Ii][Tt][Yy])?)$"
)
_SUFFIXES = ("", "_bucket", "_sum", "_count", "_total", "_created", "_gsum", "_gcount", "_info")
_SENTINEL = "\x00"  # stands in for an escaped backslash while the other escapes are undone


@dataclass(frozen=True, slots=True)
class SkippedLine:
    line: int  # 1-based
    text: str  # truncated to 200 characters
    reason: str


@dataclass(frozen=True, slots=True)
class ParseReport:
    samples: pl.DataFrame
    skipped: tuple[SkippedLine, ...]


def label(name: str) -> pl.Expr:
    """The value of label `name` from the `labels` column (null when the sample lacks it)."""
    return (
        pl.col("labels")
        .list.eval(pl.element().filter(pl.element().struct.field("name") == name).struct.field("value"))
        .list.first()
    )


def _unescape(expr: pl.Expr) -> pl.Expr:
    return (
        expr.str.replace_all(r"\\", _SENTINEL, literal=True)
        .str.replace_all(r"\n", "\n", literal=True)
        .str.replace_all(r"\"", '"', literal=True)
        .str.replace_all(_SENTINEL, "\\", literal=True)
    )


def _labels(block: pl.Expr) -> pl.Expr:
    pairs = pl.element()
    return (
        block.fill_null("")
        .str.extract_all(_PAIR)
        .list.eval(
            pl.struct(
                pairs.str.extract(_PAIR, 1).alias("name"),
                _unescape(pairs.str.extract(_PAIR, 2)).alias("value"),
            )
        )
    )


def parse_exposition_report(text: str) -> ParseReport:
    """Parse `text`; return the samples and every non-comment line that was not a valid sample."""
    lines = pl.DataFrame({"text": text.split("\n")}).with_row_index("line", offset=1)
    frame = (
        lines.lazy()
        .with_columns(pl.col("text").str.strip_suffix("\r"))
        .with_columns(
            pl.col("text").str.extract_groups(_TYPE).struct.rename_fields(["tfamily", "ttype"]).alias("t"),
            pl.col("text").str.strip_chars_start().str.starts_with("#").alias("comment"),
        )
        .unnest("t")
        .with_columns(pl.col("tfamily", "ttype").forward_fill())
        .filter(~pl.col("comment") & (pl.col("text").str.strip_chars() != ""))
        .with_columns(
            pl.col("text")
            .str.extract_groups(_SAMPLE)
            .struct.rename_fields(["name", "block", "tail"])
            .alias("m")
        )
        .unnest("m")
        .with_columns(
            pl.col("tail").str.split(" ").list.eval(pl.element().filter(pl.element() != "")).alias("parts")
        )
        .with_columns(
            pl.col("parts").list.get(0, null_on_oob=True).alias("raw_value"),
            pl.col("parts").list.get(1, null_on_oob=True).alias("raw_ts"),
            pl.col("parts").list.len().alias("nparts"),
        )
        .with_columns(
            pl.col("raw_value").str.contains(_NUMBER).fill_null(False).alias("numeric"),
            pl.col("raw_ts").str.contains(r"^-?\d+$").fill_null(True).alias("ts_ok"),
        )
        .with_columns(
            pl.when(pl.col("name").is_null() | (pl.col("nparts") == 0))
            .then(pl.lit("malformed sample line"))
            .when(~pl.col("numeric"))
            .then(pl.lit("value is not a number"))
            .when((pl.col("nparts") > 2) | ~pl.col("ts_ok"))
            .then(pl.lit("malformed sample line"))
            .alias("reason")
        )
        .collect()
    )
    bad = frame.filter(pl.col("reason").is_not_null())
    skipped = tuple(
        SkippedLine(line=int(n), text=str(t)[:200], reason=str(r))
        for n, t, r in zip(bad["line"], bad["text"], bad["reason"], strict=True)
    )
    belongs = pl.any_horizontal(pl.col("name") == pl.col("tfamily") + suffix for suffix in _SUFFIXES)
    samples = (
        frame.lazy()
        .filter(pl.col("reason").is_null())
        .with_columns(belongs.fill_null(False).alias("belongs"))
        .select(
            "name",
            _labels(pl.col("block")).alias("labels"),
            pl.col("raw_value").str.to_lowercase().str.replace(r"^\+", "").cast(pl.Float64).alias("value"),
            pl.col("raw_ts").cast(pl.Int64).alias("timestamp_ms"),
            pl.when("belongs").then("tfamily").otherwise("name").alias("family"),
            pl.when("belongs").then("ttype").otherwise(pl.lit("untyped")).alias("type"),
            "line",
        )
        .with_columns(
            label("le").str.to_lowercase().str.replace(r"^\+", "").cast(pl.Float64, strict=False).alias("le"),
            label("quantile").str.to_lowercase().cast(pl.Float64, strict=False).alias("quantile"),
        )
        .select(pl.col(name).cast(dtype) for name, dtype in SAMPLE_SCHEMA.items())
        .collect()
    )
    return ParseReport(samples=samples, skipped=skipped)


def parse_exposition(text: str) -> pl.DataFrame:
    """One row per sample (SAMPLE_SCHEMA), in exposition order; bad lines are skipped."""
    return parse_exposition_report(text).samples
