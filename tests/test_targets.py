"""allowed_targets: which hosts the agent may fetch from."""

from __future__ import annotations

import pytest

from perfagent.errors import TargetNotAllowedError
from perfagent.targets import TargetPolicy


@pytest.mark.parametrize(
    ("entries", "url", "allowed"),
    [
        (["127.0.0.0/8"], "http://127.0.0.1:8000/metrics", True),
        (["127.0.0.0/8"], "http://127.9.9.9/metrics", True),
        (["127.0.0.0/8"], "http://10.0.0.1/metrics", False),
        (["10.0.0.0/8"], "http://10.200.3.4:8000/metrics", True),
        (["::1/128"], "http://[::1]:8000/metrics", True),
        (["vllm-0.svc"], "http://vllm-0.svc:8000/metrics", True),
        (["vllm-0.svc"], "http://VLLM-0.SVC.:8000/metrics", True),
        (["vllm-0.svc"], "http://vllm-1.svc:8000/metrics", False),
        # A name is matched exactly and never resolved: a listed IP does not allow a name.
        (["127.0.0.1/32"], "http://localhost:8000/metrics", False),
        (["*"], "http://203.0.113.9/metrics", True),
        ([], "http://127.0.0.1/metrics", False),
    ],
)
def test_policy(entries: list[str], url: str, allowed: bool) -> None:
    assert TargetPolicy.from_entries(entries).allows(url) is allowed


def test_dev_mode_allows_anything() -> None:
    assert TargetPolicy.from_entries([], allow_any=True).allows("http://198.51.100.1/metrics")


def test_check_names_the_field() -> None:
    with pytest.raises(TargetNotAllowedError) as info:
        TargetPolicy.from_entries(["10.0.0.0/8"]).check("http://192.0.2.1/m", field="dcgm_url")
    assert info.value.details == {"field": "dcgm_url", "host": "192.0.2.1", "setting": "allowed_targets"}
