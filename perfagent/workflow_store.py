"""Workflows in DuckDB: the workflows, their audit trail and their steps, on the Store's one
connection and thread.

Every transition is one transaction: the workflow is read, the state machine's function decides,
and the new state, its audit event and any step rows are written together, or nothing is. All SQL
runs on the store's single thread, so a read-decide-write can never interleave with another: of two
concurrent approvals exactly one finds the workflow pending. The `version` check on the update
guards the same thing in SQL.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import duckdb

from perfagent.errors import ConflictError, NotFoundError
from perfagent.store import Store
from perfagent.workflow_machine import Transition
from perfagent.workflow_models import (
    ACTIVE,
    BatchVerdict,
    Event,
    StageName,
    Step,
    Workflow,
    WorkflowStatus,
    WorkflowType,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS workflows (
    id VARCHAR PRIMARY KEY,
    instance_id VARCHAR NOT NULL,
    workflow_type VARCHAR NOT NULL,
    group_key VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    waiting_for VARCHAR,
    current_stage VARCHAR,
    version BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    doc JSON NOT NULL
);
CREATE TABLE IF NOT EXISTS workflow_events (
    workflow_id VARCHAR NOT NULL,
    seq INTEGER NOT NULL,
    "at" TIMESTAMPTZ NOT NULL,
    actor VARCHAR NOT NULL,
    action VARCHAR NOT NULL,
    from_status VARCHAR,
    to_status VARCHAR NOT NULL,
    from_stage VARCHAR,
    to_stage VARCHAR,
    waiting_for VARCHAR,
    reason VARCHAR,
    data JSON NOT NULL,
    PRIMARY KEY (workflow_id, seq)
);
CREATE TABLE IF NOT EXISTS workflow_steps (
    key VARCHAR PRIMARY KEY,
    workflow_id VARCHAR NOT NULL,
    stage VARCHAR NOT NULL,
    n INTEGER NOT NULL,
    instance_id VARCHAR NOT NULL,
    executor VARCHAR NOT NULL,
    state VARCHAR NOT NULL,
    attempts INTEGER NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    done_at TIMESTAMPTZ,
    outcome VARCHAR,
    doc JSON NOT NULL
);
CREATE TABLE IF NOT EXISTS workflow_verdicts (
    workflow_id VARCHAR NOT NULL,
    stage VARCHAR NOT NULL,
    batch INTEGER NOT NULL,
    optimization_id VARCHAR NOT NULL,
    engine VARCHAR NOT NULL,
    model VARCHAR,
    baseline_kind VARCHAR NOT NULL,
    verdict VARCHAR NOT NULL,
    decided_by VARCHAR NOT NULL,
    decided_at TIMESTAMPTZ NOT NULL,
    doc JSON NOT NULL,
    PRIMARY KEY (workflow_id, stage, batch)
);
"""


class VerdictRow(NamedTuple):
    workflow_id: str
    optimization_id: str
    model: str | None
    verdict: BatchVerdict


_ACTIVE_SQL = ", ".join(f"'{s.value}'" for s in sorted(ACTIVE))
_STAGE_ORDER = list(StageName)


def group_key(deployment_group: str | None, instance_id: str) -> str:
    """One active optimization per key: the deployment group, or the instance on its own."""
    return f"group:{deployment_group}" if deployment_group else f"instance:{instance_id}"


def _event(conn: duckdb.DuckDBPyConnection, old: Workflow | None, t: Transition) -> None:
    new = t.workflow
    row = conn.execute(
        "SELECT coalesce(max(seq), 0) + 1 FROM workflow_events WHERE workflow_id = ?", [new.workflow_id]
    ).fetchone()
    assert row is not None
    conn.execute(
        "INSERT INTO workflow_events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            new.workflow_id,
            row[0],
            new.updated_at,
            t.actor,
            t.action,
            None if old is None else old.status.value,
            new.status.value,
            None if old is None or old.current_stage is None else old.current_stage.value,
            None if new.current_stage is None else new.current_stage.value,
            None if new.waiting_for is None else new.waiting_for.value,
            t.reason,
            json.dumps(t.data, default=str),
        ],
    )


def _write_step(conn: duckdb.DuckDBPyConnection, step: Step) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO workflow_steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            step.key,
            step.workflow_id,
            step.stage.value,
            step.n,
            step.instance_id,
            step.executor,
            step.state.value,
            step.attempts,
            step.started_at,
            step.done_at,
            step.outcome,
            step.model_dump_json(),
        ],
    )


def _write_verdict(conn: duckdb.DuckDBPyConnection, wf: Workflow, verdict: BatchVerdict) -> None:
    assert wf.change is not None
    conn.execute(
        "INSERT OR REPLACE INTO workflow_verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            wf.workflow_id,
            verdict.stage.value,
            verdict.batch,
            wf.change.optimization_id,
            wf.instance_type.value,
            wf.model,
            verdict.baseline_kind.value,
            verdict.verdict.value,
            verdict.decided_by,
            verdict.decided_at,
            verdict.model_dump_json(),
        ],
    )


def _steps(conn: duckdb.DuckDBPyConnection, workflow_id: str) -> list[Step]:
    rows = conn.execute("SELECT doc FROM workflow_steps WHERE workflow_id = ?", [workflow_id]).fetchall()
    steps = [Step.model_validate_json(r[0]) for r in rows]
    return sorted(steps, key=lambda s: (_STAGE_ORDER.index(s.stage), s.n))


def _workflow_values(wf: Workflow) -> list[Any]:
    return [
        wf.status.value,
        None if wf.waiting_for is None else wf.waiting_for.value,
        None if wf.current_stage is None else wf.current_stage.value,
        wf.version,
        wf.updated_at,
        wf.model_dump_json(),
    ]


def _in_transaction(conn: duckdb.DuckDBPyConnection, body: Callable[[], Any]) -> Any:
    conn.execute("BEGIN")
    try:
        result = body()
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


class WorkflowStore:
    def __init__(self, store: Store) -> None:
        self._store = store
        # By status, refreshed after every write: the agent's /metrics reads it without a query.
        self.counts: dict[str, int] = {}

    async def setup(self) -> None:
        def _setup(conn: duckdb.DuckDBPyConnection) -> None:
            conn.execute(_SCHEMA)
            self._count(conn)

        await self._store.run(_setup)

    def _count(self, conn: duckdb.DuckDBPyConnection) -> None:
        rows = conn.execute("SELECT status, count(*) FROM workflows GROUP BY status").fetchall()
        self.counts = {str(status): int(n) for status, n in rows}

    async def create(self, wf: Workflow, t: Transition, group: str) -> Workflow:
        """Insert a new workflow and its first event; an optimization workflow only while no other
        is active in its deployment group."""

        def _create(conn: duckdb.DuckDBPyConnection) -> Workflow:
            def body() -> Workflow:
                if wf.workflow_type is WorkflowType.OPTIMIZATION:
                    active = conn.execute(
                        # A FAILED rollback waiting for a person still holds its group.
                        "SELECT id, status FROM workflows WHERE group_key = ? AND workflow_type = ? "
                        f"AND (status IN ({_ACTIVE_SQL}) OR waiting_for IS NOT NULL) ORDER BY created_at LIMIT 1",
                        [group, WorkflowType.OPTIMIZATION.value],
                    ).fetchone()
                    if active is not None:
                        raise ConflictError(
                            f"workflow {active[0]} is already active on deployment group "
                            f"{wf.deployment_group or wf.instance_id}; one optimization at a time per group",
                            {
                                "active_workflow_id": active[0],
                                "active_status": active[1],
                                "deployment_group": wf.deployment_group,
                                "instance_id": wf.instance_id,
                            },
                        )
                conn.execute(
                    "INSERT INTO workflows (id, instance_id, workflow_type, group_key, created_at, status, "
                    "waiting_for, current_stage, version, updated_at, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        wf.workflow_id,
                        wf.instance_id,
                        wf.workflow_type.value,
                        group,
                        wf.created_at,
                        *_workflow_values(wf),
                    ],
                )
                _event(conn, None, t)
                return wf

            created: Workflow = _in_transaction(conn, body)
            self._count(conn)
            return created

        return await self._store.run(_create)

    async def transition(
        self, workflow_id: str, decide: Callable[[Workflow, list[Step]], Transition]
    ) -> Transition:
        """Read the workflow and its steps, let `decide` compute the transition (it may raise
        ConflictError), and write the result, all in one transaction on the store's thread."""

        def _transition(conn: duckdb.DuckDBPyConnection) -> Transition:
            def body() -> Transition:
                row = conn.execute("SELECT doc FROM workflows WHERE id = ?", [workflow_id]).fetchone()
                if row is None:
                    raise NotFoundError(f"no workflow {workflow_id!r}", {"workflow_id": workflow_id})
                old = Workflow.model_validate_json(row[0])
                t = decide(old, _steps(conn, workflow_id))
                updated = conn.execute(
                    "UPDATE workflows SET status = ?, waiting_for = ?, current_stage = ?, version = ?, "
                    "updated_at = ?, doc = ? WHERE id = ? AND version = ? RETURNING id",
                    [*_workflow_values(t.workflow), workflow_id, old.version],
                ).fetchall()
                if not updated:
                    raise ConflictError(
                        f"workflow {workflow_id} changed meanwhile; try again",
                        {"workflow_id": workflow_id, "status": old.status.value},
                    )
                for step in t.steps:
                    _write_step(conn, step)
                if t.verdict is not None:
                    _write_verdict(conn, t.workflow, t.verdict)
                _event(conn, old, t)
                return t

            done: Transition = _in_transaction(conn, body)
            self._count(conn)
            return done

        return await self._store.run(_transition)

    async def get(self, workflow_id: str) -> Workflow | None:
        def _get(conn: duckdb.DuckDBPyConnection) -> Workflow | None:
            row = conn.execute("SELECT doc FROM workflows WHERE id = ?", [workflow_id]).fetchone()
            return None if row is None else Workflow.model_validate_json(row[0])

        return await self._store.run(_get)

    async def detail(self, workflow_id: str) -> tuple[Workflow, list[Event], list[Step]] | None:
        """The workflow, its audit trail (oldest first) and its steps, read together."""

        def _detail(conn: duckdb.DuckDBPyConnection) -> tuple[Workflow, list[Event], list[Step]] | None:
            row = conn.execute("SELECT doc FROM workflows WHERE id = ?", [workflow_id]).fetchone()
            if row is None:
                return None
            events = conn.execute(
                'SELECT seq, "at", actor, action, from_status, to_status, from_stage, to_stage, waiting_for, '
                "reason, data FROM workflow_events WHERE workflow_id = ? ORDER BY seq",
                [workflow_id],
            ).fetchall()
            return (
                Workflow.model_validate_json(row[0]),
                [_event_model(e) for e in events],
                _steps(conn, workflow_id),
            )

        return await self._store.run(_detail)

    async def steps(self, workflow_id: str) -> list[Step]:
        return await self._store.run(lambda conn: _steps(conn, workflow_id))

    async def find(
        self, status: WorkflowStatus | None, instance_id: str | None, limit: int
    ) -> list[Workflow]:
        """Newest first; `instance_id` matches the workflow's instance or any of its group."""
        where: list[str] = []
        params: list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(status.value)
        if instance_id is not None:
            where.append("(instance_id = ? OR list_contains(json_extract_string(doc, '$.instances[*]'), ?))")
            params += [instance_id, instance_id]

        def _list(conn: duckdb.DuckDBPyConnection) -> list[Workflow]:
            sql = "SELECT doc FROM workflows" + (" WHERE " + " AND ".join(where) if where else "")
            rows = conn.execute(sql + " ORDER BY created_at DESC, id LIMIT ?", [*params, limit]).fetchall()
            return [Workflow.model_validate_json(r[0]) for r in rows]

        return await self._store.run(_list)

    async def verdicts(self, engine: str) -> list[VerdictRow]:
        """Every stored verdict on `engine`, oldest first."""

        def _verdicts(conn: duckdb.DuckDBPyConnection) -> list[VerdictRow]:
            rows = conn.execute(
                "SELECT workflow_id, optimization_id, model, doc FROM workflow_verdicts WHERE engine = ? "
                "ORDER BY decided_at",
                [engine],
            ).fetchall()
            return [VerdictRow(r[0], r[1], r[2], BatchVerdict.model_validate_json(r[3])) for r in rows]

        return await self._store.run(_verdicts)

    async def runnable(self) -> list[str]:
        """Workflows the engine has something to do for: approved, or in progress and not waiting."""

        def _runnable(conn: duckdb.DuckDBPyConnection) -> list[str]:
            rows = conn.execute(
                "SELECT id FROM workflows WHERE status = ? OR (status = ? AND waiting_for IS NULL) "
                "ORDER BY created_at",
                [WorkflowStatus.APPROVED.value, WorkflowStatus.IN_PROGRESS.value],
            ).fetchall()
            return [r[0] for r in rows]

        return await self._store.run(_runnable)


def _event_model(row: Sequence[Any]) -> Event:
    seq, at, actor, action, from_status, to_status, from_stage, to_stage, waiting_for, reason, data = row
    return Event(
        seq=seq,
        at=at,
        actor=actor,
        action=action,
        from_status=from_status,
        to_status=to_status,
        from_stage=from_stage,
        to_stage=to_stage,
        waiting_for=waiting_for,
        reason=reason,
        data=json.loads(data),
    )
