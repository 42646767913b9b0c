"""perfagent.exposition: literal tables, agreement with prometheus_client on every capture, and
property tests (round trip, agreement with prometheus_client, junk lines never hide samples, the
batched parser equal to the single-body one body by body)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal
from prometheus_client.parser import text_string_to_metric_families

from perfagent.exposition import (
    SAMPLE_SCHEMA,
    ParseReport,
    SkippedLine,
    label,
    parse_exposition,
    parse_exposition_report,
    parse_expositions,
)

FIXTURES = Path(__file__).parent / "fixtures"
CAPTURES = sorted(FIXTURES.glob("*.prom"))
NOT_A_NUMBER = "value is not a number"
MALFORMED = "malformed sample line"
INF = math.inf
NAN = math.nan
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created", "_gsum", "_gcount", "_info")


def row(
    name: str,
    value: float,
    line: int,
    *,
    labels: dict[str, str] | None = None,
    ts: int | None = None,
    family: str | None = None,
    type: str = "untyped",
    le: float | None = None,
    quantile: float | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "labels": [{"name": k, "value": v} for k, v in (labels or {}).items()],
        "value": value,
        "timestamp_ms": ts,
        "family": family or name,
        "type": type,
        "le": le,
        "quantile": quantile,
        "line": line,
    }


def frame(*rows: dict[str, Any]) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=SAMPLE_SCHEMA)


def parsed(text: str) -> pl.DataFrame:
    """parse_exposition, checking that the report path gives the very same frame."""
    samples = parse_exposition(text)
    assert_frame_equal(parse_exposition_report(text).samples, samples)
    return samples


# --- literal tables: exposition text in, rows out ------------------------------------------------

# Label values as escaped in the text: `\\` -> `\`, `\"` -> `"`, `\n` -> newline; any other escape
# (`\t`) stays verbatim, and `\\n` is a backslash followed by `n`, not a newline.
ESCAPES = r'm{path="C:\\dir",quote="say \"hi\"",nl="a\nb",tab="x\ty",bn="\\n",end="\\"} 1' + "\n"

CASES: dict[str, tuple[str, pl.DataFrame]] = {
    "escapes in label values": (
        ESCAPES,
        frame(
            row(
                "m",
                1,
                1,
                labels={
                    "path": "C:\\dir",
                    "quote": 'say "hi"',
                    "nl": "a\nb",
                    "tab": "x\\ty",
                    "bn": "\\n",
                    "end": "\\",
                },
            )
        ),
    ),
    "NaN, infinities and number spellings": (
        "a NaN\nb +Inf\nc -Inf\nd 1.5e+06\ne 35.686000\nf 15152422938\ng -0\nh .5\ni inf\nj 1E3\n",
        frame(
            row("a", NAN, 1),
            row("b", INF, 2),
            row("c", -INF, 3),
            row("d", 1.5e6, 4),
            row("e", 35.686, 5),
            row("f", 15152422938, 6),
            row("g", -0.0, 7),
            row("h", 0.5, 8),
            row("i", INF, 9),
            row("j", 1000, 10),
        ),
    ),
    "timestamps are kept in milliseconds": (
        'a 1 1712345678901\nb 2 -5\nc{x="y"} 3 +7\nd 4 999999999999999999\n',
        frame(
            row("a", 1, 1, ts=1712345678901),
            row("b", 2, 2, ts=-5),
            row("c", 3, 3, labels={"x": "y"}, ts=7),
            row("d", 4, 4, ts=999_999_999_999_999_999),
        ),
    ),
    "counter with _total and _created": (
        "# HELP foo Requests.\n# TYPE foo counter\n"
        'foo_total{a="x"} 3\nfoo_created{a="x"} 1.7e+09\n'
        "# TYPE bar_total counter\nbar_total 1\nbar_created 2\n",
        frame(
            row("foo_total", 3, 3, labels={"a": "x"}, family="foo", type="counter"),
            row("foo_created", 1.7e9, 4, labels={"a": "x"}, family="foo", type="counter"),
            row("bar_total", 1, 6, family="bar_total", type="counter"),
            # `bar_created` is neither `bar_total` nor `bar_total` + a suffix.
            row("bar_created", 2, 7),
        ),
    ),
    "summary with quantiles": (
        "# TYPE tgi_request_skipped_tokens summary\n"
        'tgi_request_skipped_tokens{quantile="0"} 0\n'
        'tgi_request_skipped_tokens{quantile="0.99"} 0\n'
        'tgi_request_skipped_tokens{quantile="1"} 0\n'
        "tgi_request_skipped_tokens_sum 0\n"
        "tgi_request_skipped_tokens_count 3423\n",
        frame(
            *(
                row(
                    "tgi_request_skipped_tokens",
                    0,
                    line,
                    labels={"quantile": q},
                    type="summary",
                    quantile=float(q),
                )
                for line, q in ((2, "0"), (3, "0.99"), (4, "1"))
            ),
            row("tgi_request_skipped_tokens_sum", 0, 5, family="tgi_request_skipped_tokens", type="summary"),
            row(
                "tgi_request_skipped_tokens_count",
                3423,
                6,
                family="tgi_request_skipped_tokens",
                type="summary",
            ),
        ),
    ),
    "histogram with Rust-style le": (
        "# TYPE tgi_batch_next_size histogram\n"
        'tgi_batch_next_size_bucket{le="0.00015000000000000001"} 1\n'
        'tgi_batch_next_size_bucket{le="8"} 2\n'
        'tgi_batch_next_size_bucket{le="128"} 3\n'
        'tgi_batch_next_size_bucket{le="+Inf"} 4\n'
        "tgi_batch_next_size_sum 9.5\ntgi_batch_next_size_count 4\n",
        frame(
            *(
                row(
                    "tgi_batch_next_size_bucket",
                    value,
                    line,
                    labels={"le": le},
                    family="tgi_batch_next_size",
                    type="histogram",
                    le=float(le),
                )
                for line, le, value in (
                    (2, "0.00015000000000000001", 1),
                    (3, "8", 2),
                    (4, "128", 3),
                    (5, "+Inf", 4),
                )
            ),
            row("tgi_batch_next_size_sum", 9.5, 6, family="tgi_batch_next_size", type="histogram"),
            row("tgi_batch_next_size_count", 4, 7, family="tgi_batch_next_size", type="histogram"),
        ),
    ),
    "le is found wherever it is in the label set": (
        'x{le="0.5",handler="/v1"} 1\nx{lex="2",le="0.25"} 2\nx{l="1",le2="3"} 3\n',
        frame(
            row("x", 1, 1, labels={"le": "0.5", "handler": "/v1"}, le=0.5),
            row("x", 2, 2, labels={"lex": "2", "le": "0.25"}, le=0.25),
            row("x", 3, 3, labels={"l": "1", "le2": "3"}),
        ),
    ),
    "label values holding braces, commas, equals and spaces": (
        'm{a="}",b=",",c="x=y",d="a b",e="{}",f="} 1"} 2\n',
        frame(row("m", 2, 1, labels={"a": "}", "b": ",", "c": "x=y", "d": "a b", "e": "{}", "f": "} 1"})),
    ),
    "empty label set": ("m{} 1\nm {} 2\n", frame(row("m", 1, 1), row("m", 2, 2))),
    "no trailing newline": ("a 1\nb 2", frame(row("a", 1, 1), row("b", 2, 2))),
    "CRLF line endings": (
        '# TYPE a gauge\r\na{x="1"} 1\r\nb 2 123\r\n\r\n',
        frame(row("a", 1, 2, labels={"x": "1"}, type="gauge"), row("b", 2, 3, ts=123)),
    ),
    "optional whitespace and tabs": (
        ' \tm \t{ a = "1" ,\tb="2" , }  3 \t 42  \n  n\t4\n',
        frame(row("m", 3, 1, labels={"a": "1", "b": "2"}, ts=42), row("n", 4, 2)),
    ),
    "samples without HELP/TYPE (dcgm-exporter pasted)": (
        'DCGM_FI_DEV_SM_CLOCK{gpu="0",modelName="Tesla T4"} 660\nDCGM_FI_DEV_GPU_UTIL{gpu="0"} 91\n',
        frame(
            row("DCGM_FI_DEV_SM_CLOCK", 660, 1, labels={"gpu": "0", "modelName": "Tesla T4"}),
            row("DCGM_FI_DEV_GPU_UTIL", 91, 2, labels={"gpu": "0"}),
        ),
    ),
    "TYPE applies past unrelated samples, HELP and comments do not count": (
        "# TYPE a gauge\nb 1\n# HELP c Other.\n# just a comment\n# EOF\na 2\n",
        frame(row("b", 1, 2), row("a", 2, 6, type="gauge")),
    ),
    "a TYPE line without samples adds nothing": (
        "# TYPE a gauge\na 1\n# HELP h Latency.\n# TYPE h histogram\n",
        frame(row("a", 1, 2, type="gauge")),
    ),
    "metric names with colons": (
        '# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m",engine="0"} 3.0\n',
        frame(
            row("vllm:num_requests_running", 3, 2, labels={"model_name": "m", "engine": "0"}, type="gauge")
        ),
    ),
    # Documented leniency: the format forbids these, they are kept as written.
    "empty label entries and repeated label names are accepted": (
        'x{a="1",,b="2",} 1\ny{le="1",a="1",le="2",quantile="0.1",quantile="0.9"} 2\n',
        frame(
            row("x", 1, 1, labels={"a": "1", "b": "2"}),
            {
                **row("y", 2, 2, le=2.0, quantile=0.9),  # the last value wins, as in a dict
                "labels": [
                    {"name": n, "value": v}
                    for n, v in (
                        ("le", "1"),
                        ("a", "1"),
                        ("le", "2"),
                        ("quantile", "0.1"),
                        ("quantile", "0.9"),
                    )
                ],
            },
        ),
    ),
    "empty input": ("", frame()),
    "comments and blank lines only": ("# HELP a x\n\n   \n# TYPE a gauge\n", frame()),
}


@pytest.mark.parametrize(("text", "expected"), CASES.values(), ids=list(CASES))
def test_table(text: str, expected: pl.DataFrame) -> None:
    samples = parsed(text)
    assert samples.schema == SAMPLE_SCHEMA
    assert_frame_equal(samples, expected)
    assert parse_exposition_report(text).skipped == ()


def test_le_is_a_number_not_a_string() -> None:
    buckets = parsed(CASES["histogram with Rust-style le"][0]).filter(pl.col("le").is_not_null())
    # As strings "128" < "8"; as numbers the buckets are already in order.
    assert buckets["le"].is_sorted()
    assert buckets["le"].to_list() == [0.00015000000000000001, 8.0, 128.0, INF]


def test_schema_and_column_order_hold_for_every_result() -> None:
    for text in ("", "# only a comment\n", "a 1\n", "garbage\n"):
        samples = parse_exposition(text)
        assert samples.schema == SAMPLE_SCHEMA
        assert samples.columns == list(SAMPLE_SCHEMA)


# --- skipped lines --------------------------------------------------------------------------------

DCGM_ERROR = (
    'DCGM_FI_DEV_XID_ERRORS{gpu="0",UUID="GPU-1",device="nvidia0",modelName="NVIDIA A100",'
    'GPU_I_PROFILE="1g.10gb",GPU_I_ID="7"} ERROR - FAILED TO CONVERT TO STRING'
)


def test_dcgm_error_line_is_skipped_and_the_rest_kept() -> None:
    text = (
        "# HELP DCGM_FI_DEV_XID_ERRORS Value of the last XID error encountered.\n"
        "# TYPE DCGM_FI_DEV_XID_ERRORS gauge\n"
        f"{DCGM_ERROR}\n"
        "# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).\n"
        "# TYPE DCGM_FI_DEV_GPU_TEMP gauge\n"
        'DCGM_FI_DEV_GPU_TEMP{gpu="0"} 31\n'
    )
    report = parse_exposition_report(text)
    assert report.skipped == (SkippedLine(line=3, text=DCGM_ERROR, reason=NOT_A_NUMBER),)
    assert_frame_equal(
        report.samples, frame(row("DCGM_FI_DEV_GPU_TEMP", 31, 6, labels={"gpu": "0"}, type="gauge"))
    )
    assert_frame_equal(parse_exposition(text), report.samples)
    # prometheus_client gives up on the whole text instead.
    with pytest.raises(ValueError, match="could not convert"):
        list(text_string_to_metric_families(text))


def test_wholly_bad_body_reports_every_line() -> None:
    body = "<html>\n<head><title>502 Bad Gateway</title></head>\n\n<body>nginx</body>\n</html>"
    report = parse_exposition_report(body)
    assert report.samples.height == 0
    assert report.samples.schema == SAMPLE_SCHEMA
    assert report.skipped == tuple(
        SkippedLine(line=n, text=t, reason=MALFORMED)
        for n, t in (
            (1, "<html>"),
            (2, "<head><title>502 Bad Gateway</title></head>"),
            (4, "<body>nginx</body>"),
            (5, "</html>"),
        )
    )


BAD_LINES = {
    "foo": MALFORMED,  # no value
    'foo{a="1"}': MALFORMED,
    'foo{a="1" 1': MALFORMED,  # unclosed label set
    "foo{a=1} 1": MALFORMED,  # unquoted label value
    'foo{a="1" b="2"} 1': MALFORMED,  # missing comma
    'foo{,a="1"} 1': MALFORMED,
    'foo{"a"="1"} 1': MALFORMED,
    'foo{1a="1"} 1': MALFORMED,
    'foo{a="1\\"} 1': MALFORMED,  # the closing quote is escaped
    "1foo 1": MALFORMED,
    "foo-bar 1": MALFORMED,
    "foo1": MALFORMED,
    "foo 1 2 3": MALFORMED,
    "foo 1 1.5": MALFORMED,  # timestamps are integers
    "foo 1 1234567890123456789": MALFORMED,  # more than 18 digits (documented limit)
    '{__name__="foo"} 1': MALFORMED,  # documented as unsupported
    '"foo" 1': MALFORMED,
    "foo bar": NOT_A_NUMBER,
    "foo 1_000": NOT_A_NUMBER,
    "foo 0x10": NOT_A_NUMBER,
    "foo 1,5": NOT_A_NUMBER,
    'foo{a="1"} ERROR': NOT_A_NUMBER,
    'foo{a="1"}ERROR': NOT_A_NUMBER,
    'foo{a="}"} - 1': NOT_A_NUMBER,
}


@pytest.mark.parametrize(("bad", "reason"), BAD_LINES.items(), ids=list(BAD_LINES))
def test_bad_line_is_skipped_with_its_reason(bad: str, reason: str) -> None:
    report = parse_exposition_report(f"ok 1\n{bad}\nok 2\n")
    assert report.skipped == (SkippedLine(line=2, text=bad, reason=reason),)
    assert_frame_equal(report.samples, frame(row("ok", 1, 1), row("ok", 2, 3)))


def test_skipped_text_is_truncated_and_loses_the_carriage_return() -> None:
    long = "x" * 250 + " not-a-number"
    report = parse_exposition_report(f"{long}\r\nshort line\r\n")
    assert report.skipped == (
        SkippedLine(line=1, text=long[:200], reason=NOT_A_NUMBER),
        SkippedLine(line=2, text="short line", reason=NOT_A_NUMBER),
    )


def test_report_and_plain_parse_agree_when_lines_are_skipped() -> None:
    text = f"a 1\n{DCGM_ERROR}\n# TYPE b gauge\nb 2\nnonsense here\n"
    report = parse_exposition_report(text)
    assert isinstance(report, ParseReport)
    assert [s.line for s in report.skipped] == [2, 5]
    assert_frame_equal(report.samples, parse_exposition(text))
    assert_frame_equal(report.samples, frame(row("a", 1, 1), row("b", 2, 4, type="gauge")))


# --- label() ---------------------------------------------------------------------------------------


def test_label_helper_in_with_columns_and_filter() -> None:
    samples = parsed('x{engine="0",model="m"} 1\nx{model="m"} 2\nx{engine="1"} 3\ny 4\n')
    assert samples.with_columns(label("engine").alias("engine"))["engine"].to_list() == ["0", None, "1", None]
    assert samples.filter(label("engine") == "1")["value"].to_list() == [3.0]
    assert samples.select(label("absent"))["labels"].dtype == pl.String
    repeated = parsed('x{a="1",b="2",a="3"} 1\n')
    assert repeated.select(label("a"))["labels"].to_list() == ["3"]


# --- agreement with prometheus_client on every capture ---------------------------------------------


def _same_number(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("capture", CAPTURES, ids=[p.name for p in CAPTURES])
def test_capture_agrees_with_prometheus_client(capture: Path) -> None:
    text = capture.read_text()
    report = parse_exposition_report(text)
    assert report.skipped == ()
    assert report.samples.schema == SAMPLE_SCHEMA
    assert_frame_equal(parse_exposition(text), report.samples)

    # prometheus_client also yields families without samples (the V1 capture ends with a TYPE line,
    # the kubeai capture declares spec_decode families it never fills); they add no samples.
    theirs = [(family, s) for family in text_string_to_metric_families(text) for s in family.samples]
    ours = report.samples.to_dicts()
    assert len(ours) == len(theirs)
    for mine, (family, sample) in zip(ours, theirs, strict=True):
        name = mine["name"]
        if family.type == "counter" and not name.endswith("_total"):
            # Documented: prometheus_client appends _total to counters exposed without it (TGI's
            # tgi_request_count, dcgm-exporter's DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION).
            name += "_total"
        assert sample.name == name
        assert sample.labels == {p["name"]: p["value"] for p in mine["labels"]}
        assert _same_number(float(sample.value), mine["value"]), (sample, mine)
        # Documented: ours in ms as exposed, theirs in seconds. No capture has timestamps.
        assert sample.timestamp is None and mine["timestamp_ms"] is None
        # Same family and type, up to naming: prometheus_client strips _total from counter
        # families and calls untyped families "unknown".
        assert family.type == {"untyped": "unknown"}.get(mine["type"], mine["type"])
        if family.type == "counter":
            assert mine["family"] in (family.name, family.name + "_total")
        else:
            assert mine["family"] == family.name


# --- property tests -------------------------------------------------------------------------------

METRIC_NAMES = st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,20}", fullmatch=True)
# prometheus_client rejects label names starting with "__" (reserved); we accept them.
LABEL_NAMES = st.one_of(
    st.sampled_from(["le", "quantile", "engine", "l", "lex"]),
    st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,15}", fullmatch=True),
).filter(lambda n: not n.startswith("__"))
# A scrape body is decoded from UTF-8 (errors replaced), so it never holds lone surrogates.
LABEL_VALUES = st.one_of(
    st.text(st.one_of(st.sampled_from('\\"\n{},= \t#\r'), st.characters(codec="utf-8")), max_size=20),
    st.floats().map(repr),
    st.sampled_from(["+Inf", "-Inf", "NaN", "0.00015000000000000001", "128", "1_0", " 1", "1e"]),
)
VALUES = st.floats(allow_nan=True, allow_infinity=True)
TIMESTAMPS = st.none() | st.integers(-(10**18) + 1, 10**18 - 1)
SPELLINGS: dict[str, Callable[[float], str]] = {  # how exporters write the specials
    "repr": repr,
    "go": lambda v: {INF: "+Inf", -INF: "-Inf"}.get(v, "NaN" if math.isnan(v) else repr(v)),
    "%.17g": lambda v: f"{v:.17g}",
}


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def as_float(text: str) -> float | None:
    """What a label value means as a number: Python's float() minus whitespace, digit separators
    and non-ASCII digits, which the format does not allow."""
    if text != text.strip() or "_" in text or not text.isascii():
        return None
    try:
        return float(text)
    except ValueError:
        return None


@st.composite
def samples(draw: st.DrawFn) -> tuple[str, dict[str, str], float, str, int | None]:
    name = draw(METRIC_NAMES)
    labels = draw(st.dictionaries(LABEL_NAMES, LABEL_VALUES, max_size=4))
    value = draw(VALUES)
    spelled = SPELLINGS[draw(st.sampled_from(sorted(SPELLINGS)))](value)
    return name, labels, value, spelled, draw(TIMESTAMPS)


def render(name: str, labels: dict[str, str], spelled: str, ts: int | None) -> str:
    pairs = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
    return f"{name}{{{pairs}}} {spelled}" + ("" if ts is None else f" {ts}")


@settings(max_examples=200, deadline=None)
@given(st.lists(samples(), max_size=8), st.booleans())
def test_round_trip_and_prometheus_client_agree(
    generated: list[tuple[str, dict[str, str], float, str, int | None]], final_newline: bool
) -> None:
    text = "\n".join(render(n, lab, sp, ts) for n, lab, _, sp, ts in generated)
    text += "\n" if final_newline and generated else ""
    expected = frame(
        *(
            row(
                name,
                value,
                line,
                labels=labels,
                ts=ts,
                le=as_float(labels["le"]) if "le" in labels else None,
                quantile=as_float(labels["quantile"]) if "quantile" in labels else None,
            )
            for line, (name, labels, value, _, ts) in enumerate(generated, start=1)
        )
    )
    assert_frame_equal(parsed(text), expected)
    assert parse_exposition_report(text).skipped == ()

    theirs = [s for family in text_string_to_metric_families(text) for s in family.samples]
    assert len(theirs) == len(generated)
    for sample, (name, labels, value, _, ts) in zip(theirs, generated, strict=True):
        assert (sample.name, sample.labels) == (name, labels)
        assert _same_number(float(sample.value), value)
        # prometheus_client divides the millisecond timestamp by 1000.
        assert sample.timestamp == (None if ts is None else ts / 1000)


TYPES = st.sampled_from(["counter", "gauge", "histogram", "summary", "untyped", "info", "gaugehistogram"])


@st.composite
def families(draw: st.DrawFn) -> tuple[str, str, list[str]]:
    family = draw(METRIC_NAMES)
    names = st.one_of(st.sampled_from(["", *SUFFIXES]).map(lambda s: family + s), METRIC_NAMES)
    return family, draw(TYPES), draw(st.lists(names, max_size=5))


@settings(max_examples=200, deadline=None)
@given(st.lists(families(), max_size=5))
def test_family_and_type_follow_the_preceding_type_line(blocks: list[tuple[str, str, list[str]]]) -> None:
    lines: list[str] = []
    expected: list[dict[str, Any]] = []
    for family, type_, names in blocks:
        lines += [f"# HELP {family} Some help.", f"# TYPE {family} {type_}"]
        for name in names:
            lines.append(f"{name} 1")
            mine = name == family or any(name == family + s for s in SUFFIXES)
            expected.append(
                row(name, 1, len(lines), family=family if mine else name, type=type_ if mine else "untyped")
            )
    assert_frame_equal(parsed("\n".join(lines)), frame(*expected))


JUNK = st.one_of(
    st.text(st.characters(exclude_characters="\n", codec="utf-8"), max_size=40),
    st.sampled_from(
        [
            "foo{",
            'foo{a="1"',
            "}",
            '"',
            "\\",
            "# TYPE x",
            "# TYPE x counter",
            'x{a="\\"} 1',
            "x 1 2 3",
            DCGM_ERROR,
            "x NaN NaN",
            "\r",
            "",
            "x{} ",
        ]
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), samples(), JUNK), max_size=12))
def test_junk_lines_never_hide_valid_samples(
    mixed: list[tuple[bool, tuple[str, dict[str, str], float, str, int | None], str]],
) -> None:
    lines: list[str] = []
    valid: dict[int, tuple[str, dict[str, str], float, int | None]] = {}
    for is_sample, (name, labels, value, spelled, ts), junk in mixed:
        if is_sample:
            lines.append(render(name, labels, spelled, ts))
            valid[len(lines)] = (name, labels, value, ts)
        else:
            lines.append(junk)
    report = parse_exposition_report("\n".join(lines))
    found = {r["line"]: r for r in report.samples.to_dicts()}
    for line, (name, labels, value, ts) in valid.items():
        mine = found[line]
        assert (mine["name"], mine["timestamp_ms"]) == (name, ts)
        assert mine["labels"] == [{"name": k, "value": v} for k, v in labels.items()]
        assert _same_number(mine["value"], value)
    # Junk may happen to be a valid sample, but whatever is skipped is junk.
    assert {s.line for s in report.skipped}.isdisjoint(valid)
    assert {s.line for s in report.skipped}.isdisjoint(found)
    skipped = {s.line: s for s in report.skipped}
    for line, text in enumerate(lines, start=1):
        if re.match(r"[ \t]*(#|\r?$)", text):  # comments and blank lines are neither
            assert line not in found and line not in skipped
        elif line not in found:
            assert skipped[line].text == text.removesuffix("\r")[:200]
            assert skipped[line].reason in (NOT_A_NUMBER, MALFORMED)


# --- parse_expositions: many bodies in one query, each as if parsed alone ------------------------


def assert_same_reports(bodies: list[str]) -> None:
    batched = parse_expositions(bodies)
    assert len(batched) == len(bodies)
    for body, report in zip(bodies, batched, strict=True):
        alone = parse_exposition_report(body)
        assert_frame_equal(report.samples, alone.samples)
        assert report.samples.schema == SAMPLE_SCHEMA
        assert report.skipped == alone.skipped


def test_batch_of_every_capture_equals_each_capture_alone() -> None:
    texts = [path.read_text() for path in CAPTURES]
    assert_same_reports(texts)
    assert_same_reports(texts[::-1] + texts)  # repeated bodies and another order


def test_batch_of_every_table_case_equals_each_case_alone() -> None:
    assert_same_reports([text for text, _ in CASES.values()])


def test_type_line_does_not_reach_the_next_body() -> None:
    first, second = parse_expositions(["# TYPE x counter\nx_total 1\n# TYPE y gauge", "x_total 2\ny 3\n"])
    assert_frame_equal(first.samples, frame(row("x_total", 1, 2, family="x", type="counter")))
    assert_frame_equal(second.samples, frame(row("x_total", 2, 1), row("y", 3, 2)))


def test_batch_reports_skipped_lines_per_body_with_its_own_line_numbers() -> None:
    good, html, mixed, empty = parse_expositions(["a 1\n", "<html>\n</html>", f"b 2\n{DCGM_ERROR}\n", ""])
    assert good.skipped == () and empty.skipped == ()
    assert html.samples.height == 0 and html.samples.schema == SAMPLE_SCHEMA
    assert html.skipped == (SkippedLine(1, "<html>", MALFORMED), SkippedLine(2, "</html>", MALFORMED))
    assert mixed.skipped == (SkippedLine(2, DCGM_ERROR, NOT_A_NUMBER),)
    assert_frame_equal(mixed.samples, frame(row("b", 2, 1)))
    assert empty.samples.height == 0 and empty.samples.schema == SAMPLE_SCHEMA


def test_empty_batch() -> None:
    assert parse_expositions([]) == []


# A few names shared by every body, so TYPE lines, families and suffixes meet across body boundaries.
SHARED_NAMES = st.sampled_from(["x", "x_total", "x_bucket", "x_created", "y", "y_sum", "_total"])
BODY_LINES = st.one_of(
    st.builds(lambda name, type_: f"# TYPE {name} {type_}", SHARED_NAMES, TYPES),
    st.builds(lambda name: f"# HELP {name} help", SHARED_NAMES),
    st.builds(
        lambda name, labels, value: render(name, labels, repr(value), None),
        SHARED_NAMES,
        st.dictionaries(LABEL_NAMES, LABEL_VALUES, max_size=3),
        VALUES,
    ),
    samples().map(lambda s: render(s[0], s[1], s[3], s[4])),
    JUNK,
)
BODIES = st.builds(
    lambda lines, end: "\n".join(lines) + end,
    st.lists(BODY_LINES, max_size=8),
    st.sampled_from(["", "\n", "\r\n"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(BODIES, max_size=6))
def test_batched_reports_equal_each_body_parsed_alone(bodies: list[str]) -> None:
    assert_same_reports(bodies)
