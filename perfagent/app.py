"""The application factory: `create_app(settings)` wires settings, store, scraper and routes; all
state lives on the returned application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from perfagent import __version__
from perfagent.api import analysis, config, health, history, instances, metrics, optimization
from perfagent.api import backtest as backtest_api
from perfagent.api import workflows as workflows_api
from perfagent.canary import MANUAL, STATISTICAL, CanaryJudge, ManualJudge
from perfagent.canary_judge import StatisticalJudge
from perfagent.clock import utc_now
from perfagent.collect import SnapshotCache
from perfagent.context import AGENT, Agent
from perfagent.demo import DemoFleet, SimDemo, default_demo_dir
from perfagent.detect import compile_rules, default_workers
from perfagent.detection import Detector
from perfagent.discovery import Discovery
from perfagent.docs import DOC_ROUTE_NAMES, setup_docs
from perfagent.errors import ConfigError
from perfagent.executors.registry import ExecutorRegistry, build_executors
from perfagent.export import build_registry
from perfagent.findings import FindingTracker
from perfagent.history import HistoryWriter
from perfagent.middleware import error_middleware
from perfagent.models import EngineName
from perfagent.normalize import RawSnapshot
from perfagent.openapi import build_openapi
from perfagent.optimization_spec import OptimizationsError, load_engine_optimizations
from perfagent.poller import Poller
from perfagent.promclient import PromClient
from perfagent.routing import Endpoint, add_endpoints
from perfagent.rules import load_rules
from perfagent.scrape import Scraper
from perfagent.settings import Settings
from perfagent.slo import SLO_DIR_NAME, load_slos
from perfagent.slo_history import SloEvaluator
from perfagent.store import Store
from perfagent.targets import TargetPolicy
from perfagent.workflow_engine import WorkflowEngine

log = logging.getLogger("perfagent")

ENDPOINTS: tuple[Endpoint, ...] = (
    *health.ENDPOINTS,
    *config.ENDPOINTS,
    *metrics.ENDPOINTS,
    *history.ENDPOINTS,
    *analysis.ENDPOINTS,
    *backtest_api.ENDPOINTS,
    *optimization.ENDPOINTS,
    *instances.ENDPOINTS,
    *workflows_api.ENDPOINTS,
)

REGISTRY = web.AppKey("registry", CollectorRegistry)

__all__ = ["DOC_ROUTE_NAMES", "ENDPOINTS", "create_app"]


def _self_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in {"", "0.0.0.0", "::"} else settings.host
    return f"http://{'[' + host + ']' if ':' in host else host}:{settings.port}"


def _check_targets(settings: Settings, policy: TargetPolicy) -> None:
    for spec in settings.instances:
        for field, url in (("metrics_url", spec.metrics_url), ("dcgm_url", spec.dcgm_url)):
            if url and not policy.allows(url):
                raise ConfigError(
                    f"instance {spec.id!r}: {field} {url} is not in allowed_targets "
                    f"({', '.join(policy.describe())}); add its host or CIDR, or run with --dev"
                )


async def _restore_snapshots(store: Store) -> SnapshotCache:
    """Start each instance's next window at its last stored scrape, across restarts."""
    cache = SnapshotCache()
    for instance_id, (url, raw) in (await store.last_snapshots()).items():
        try:
            cache.restore(instance_id, url, RawSnapshot.model_validate_json(raw))
        except ValueError:
            log.warning("ignoring an unreadable stored snapshot of %s", instance_id)
    return cache


def create_app(
    settings: Settings, *, executors: ExecutorRegistry | None = None, judge: CanaryJudge | None = None
) -> web.Application:
    """Build the agent's application; resources open on startup and close on cleanup. `executors`
    and `judge` replace the ones the settings choose (workflow tests bring their own)."""
    executors = executors or build_executors(settings)
    policy = TargetPolicy.from_entries(settings.allowed_targets, allow_any=settings.dev)
    _check_targets(settings, policy)
    if settings.rules_dir is not None and not settings.rules_dir.exists():
        raise ConfigError(f"rules_dir {settings.rules_dir} does not exist")
    # A bad rule file stops start-up here, naming the file, the rule and the line.
    ruleset = load_rules([settings.rules_dir] if settings.rules_dir else [])
    compiled = compile_rules(ruleset)
    # SLO files live in `slos/` of the rules directory; a bad one stops start-up like a bad rule file.
    user_slos = settings.rules_dir / SLO_DIR_NAME if settings.rules_dir is not None else None
    slos = load_slos([user_slos] if user_slos is not None and user_slos.is_dir() else [])
    for engine in EngineName:
        try:
            load_engine_optimizations(engine.value)
        except OptimizationsError as exc:
            raise ConfigError(str(exc)) from exc
    demo: DemoFleet | SimDemo | None = None
    # A fleet discovered from Prometheus is a configured fleet: no demo beside it.
    no_fleet = not settings.instances and not settings.discovery
    if no_fleet and settings.demo_fleet == "sim":
        demo = SimDemo.build(settings.demo_fleet_size, _self_url(settings))
    elif no_fleet and settings.demo_fleet == "captures":
        demo_dir = settings.demo_fleet_dir or default_demo_dir()
        if not demo_dir.is_dir():
            raise ConfigError(f"demo_fleet_dir {demo_dir} is not a directory")
        demo = DemoFleet.build(demo_dir, _self_url(settings))

    app = web.Application(middlewares=[error_middleware])

    async def resources(app: web.Application) -> AsyncIterator[None]:
        store = await Store.open(settings.db_path)
        scraper = Scraper(
            policy,
            timeout=settings.scrape_timeout,
            max_bytes=settings.scrape_max_bytes,
            concurrency=settings.scrape_concurrency,
            user_agent=f"perfagent/{__version__}",
        )
        tasks: list[asyncio.Task[None]] = []
        history: HistoryWriter | None = None
        # Detection's threads, started once: evaluations reduce their quantities in parallel.
        detection_pool = ThreadPoolExecutor(default_workers(), thread_name_prefix="perfagent-detect")
        prometheus = (
            PromClient(
                settings.prometheus_url,
                timeout=settings.prometheus_timeout,
                retries=settings.prometheus_retries,
            )
            if settings.prometheus_url
            else None
        )
        try:
            await store.sync_config_instances(settings.instances, utc_now())
            snapshots = await _restore_snapshots(store)
            history = HistoryWriter(
                store,
                flush_interval=settings.history_flush_interval,
                retention=timedelta(days=settings.retention_days),
            )
            detector = Detector(store, compiled, FindingTracker.from_rules(compiled), detection_pool)
            await detector.restore()
            poller = Poller(scraper, snapshots, history, settings.polling_interval)
            statistical = StatisticalJudge(
                store,
                history,
                scraper,
                lambda instance_id: agent.instance(instance_id),
                warmup=settings.canary_warmup,
                window=settings.canary_window,
                polling_interval=settings.polling_interval,
                alpha=settings.canary_alpha,
            )
            workflows = WorkflowEngine(
                store,
                executors,
                {MANUAL: ManualJudge(), STATISTICAL: statistical},
                detector,
                history,
                lambda instance_id: agent.instance(instance_id),
                validation_delay=settings.workflow_validation_delay,
                judge_override=judge,
            )
            await workflows.setup()
            agent = Agent(
                settings=settings,
                store=store,
                scraper=scraper,
                demo=demo,
                snapshots=snapshots,
                history=history,
                poller=poller,
                detector=detector,
                rules=ruleset,
                slos=SloEvaluator(store, slos),
                workflows=workflows,
                prometheus=prometheus,
                discovery=Discovery(prometheus, settings.discovery)
                if prometheus is not None and settings.discovery
                else None,
            )
            poller.on_cycle = agent.detect_cycle
            app[AGENT] = agent
            app[REGISTRY] = build_registry(agent)
            watched = await agent.instances()
            log.info(
                "perfagent %s started",
                __version__,
                extra={
                    "db": str(settings.db_path.resolve())
                    if str(settings.db_path) != ":memory:"
                    else ":memory:",
                    "instances": [f"{i.id} ({i.engine.value}, {i.source.value})" for i in watched],
                    "rules_dir": str(settings.rules_dir) if settings.rules_dir else None,
                    "rules": len(ruleset),
                    "rule_files": [str(p) for p in ruleset.files],
                    "allowed_targets": policy.describe(),
                    "polling_interval": settings.polling_interval,
                    "discovery": [d.selector for d in settings.discovery],
                },
            )
            if policy.allow_any:
                log.warning("any target may be fetched (dev mode or allowed_targets '*'): not for production")
            if demo is not None:
                log.info(
                    "no instance configured: serving a demo fleet of %d %s",
                    len(demo.instances),
                    "simulated instances under /sim" if isinstance(demo, SimDemo) else "bundled captures",
                )
            tasks.append(asyncio.create_task(history.run(), name="history-writer"))
            tasks.append(asyncio.create_task(workflows.run(), name="workflows"))
            if agent.discovery is not None:
                tasks.append(asyncio.create_task(agent.discovery.run(), name="discovery"))
            # Discovered instances are read from Prometheus, never scraped.
            tasks.append(asyncio.create_task(poller.run(agent.scraped_instances), name="poller"))
            yield
        finally:
            for task in reversed(tasks):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if history is not None:
                # SIGTERM and normal shutdown: what was scraped is written before the file closes.
                await history.flush()
            await scraper.close()
            await executors.close()  # the http and sim executors' client sessions
            if prometheus is not None:
                prometheus.close()
            await store.close()
            detection_pool.shutdown(wait=False)  # its threads end with their last task

    app.cleanup_ctx.append(resources)
    add_endpoints(app, ENDPOINTS)
    document = build_openapi(ENDPOINTS, title="perfagent", version=__version__)

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(document)

    app.router.add_get("/openapi.json", openapi, name="openapi")

    async def own_metrics(request: web.Request) -> web.StreamResponse:
        # The handler is built per request from the app's own registry: no global registry is used.
        handler = make_aiohttp_handler(request.app[REGISTRY])
        return await handler(request)

    app.router.add_get("/metrics", own_metrics, name="agent-metrics")
    setup_docs(
        app,
        openapi_url="/openapi.json",
        title="perfagent API",
        redoc_dirs=[settings.redoc_dir] if settings.redoc_dir else [],
    )
    if demo is not None:
        demo.setup_routes(app)
    return app
