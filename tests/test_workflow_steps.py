"""Batches of a rollout: the canary alone, then doubling the changed count."""

from __future__ import annotations

import pytest

from perfagent.workflow_steps import batch_plan


@pytest.mark.parametrize(
    ("size", "sizes"),
    [
        (1, [1]),
        (2, [1, 1]),
        (3, [1, 1, 1]),
        (4, [1, 1, 2]),
        (6, [1, 1, 2, 2]),
        (9, [1, 1, 2, 4, 1]),
        (16, [1, 1, 2, 4, 8]),
    ],
)
def test_batches_double_the_changed_count(size: int, sizes: list[int]) -> None:
    ids = [f"i{n}" for n in range(size)]
    plan = batch_plan(ids)
    assert [len(b) for b in plan] == sizes
    assert [i for b in plan for i in b] == ids  # every instance once, in the group's order
    # Until the last batch, the instances not changed yet outnumber none: a baseline remains.
    for n in range(len(plan) - 1):
        assert sum(len(b) for b in plan[n + 1 :]) > 0


def test_no_instances_no_batches() -> None:
    assert batch_plan([]) == []
