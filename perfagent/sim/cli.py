"""``perfagent sim``: serve a simulated fleet (the owner of `perfagent.cli` wires these two functions in).

perfagent sim --engine mixed --instances 6 --port 8100 --scenario overload
curl localhost:8100/instances
curl localhost:8100/instances/vllm-0/metrics
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from aiohttp import web

from perfagent.sim.fleet import DEFAULT_MODEL, SimFleet
from perfagent.sim.knobs import ENGINES, SCENARIOS, KnobError


def _knob(text: str) -> tuple[str, str, Any]:
    """``[engine:]name=value``; the value is JSON when it parses (``0.8``, ``true``), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected [ENGINE:]KNOB=VALUE, got {text!r}")
    engine, _, name = key.rpartition(":")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return engine, name, value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sim`` sub-command and its flags."""
    p = subparsers.add_parser(
        "sim",
        help="serve simulated vLLM/TGI/SGLang instances (metrics + control API)",
        description="Serve N simulated inference servers, each at /instances/<id>/metrics, "
        "with a JSON control API for load, knobs and (with --clock manual) time.",
    )
    p.add_argument(
        "--engine", choices=[*ENGINES, "mixed"], default="vllm", help="mixed = vllm, tgi, sglang, ..."
    )
    p.add_argument("--instances", type=int, default=1, metavar="N")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--vllm-version", choices=["v1", "v0"], default="v1", help="vLLM metric era (default v1)")
    p.add_argument(
        "--clock", choices=["real", "manual"], default="real", help="manual: time moves on POST /advance"
    )
    p.add_argument("--speed", type=float, default=1.0, help="real clock: simulated seconds per wall second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name in the labels")
    p.add_argument(
        "--scenario", choices=list(SCENARIOS), default="steady", help="load preset (default steady)"
    )
    p.add_argument("--rate", type=float, help="arrivals per second per instance")
    p.add_argument("--prompt-tokens", type=float, help="mean prompt length")
    p.add_argument("--output-tokens", type=float, help="mean output length")
    p.add_argument("--prefix-share", type=float, help="share of prompt tokens in a shared prefix (0-1)")
    p.add_argument("--prefix-groups", type=int, help="number of distinct shared prefixes")
    p.add_argument("--max-tokens", type=int, help="max_tokens the clients send")
    p.add_argument(
        "--set",
        dest="knobs",
        action="append",
        type=_knob,
        default=[],
        metavar="[ENGINE:]KNOB=VALUE",
        help="initial engine setting, e.g. --set max_num_seqs=128 or --set sglang:schedule_policy=lpm",
    )
    p.add_argument("--restart-seconds", type=float, default=30.0, help="downtime when a knob changes")
    p.add_argument("--tick", type=float, default=0.25, help="model tick in seconds (finest)")


def fleet_from_args(args: argparse.Namespace) -> SimFleet:
    load: dict[str, Any] = {"scenario": args.scenario}
    for flag in ("rate", "prompt_tokens", "output_tokens", "prefix_share", "prefix_groups", "max_tokens"):
        if getattr(args, flag) is not None:
            load[flag] = getattr(args, flag)
    engines = list(ENGINES) if args.engine == "mixed" else [args.engine]
    settings: dict[str, dict[str, Any]] = {}
    for engine, name, value in args.knobs:
        for target in [engine] if engine else engines:
            settings.setdefault(target, {})[name] = value
    return SimFleet(
        args.engine,
        args.instances,
        seed=args.seed,
        clock=args.clock,
        vllm_version=args.vllm_version,
        model=args.model,
        load=load,
        settings=settings,
        restart_seconds=args.restart_seconds,
        tick=args.tick,
        speed=args.speed,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM. Returns the exit status."""
    try:
        fleet = fleet_from_args(args)
    except (KnobError, ValueError) as exc:
        print(f"perfagent sim: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    base = f"http://{args.host}:{args.port}"
    print(
        f"perfagent sim: {len(fleet.instances)} SIMULATED instance(s), clock={fleet.clock}, seed={fleet.seed}"
    )
    for inst in fleet.instances.values():
        print(f"  {inst.id:<10} {inst.engine} {inst.version:<6} {base}/instances/{inst.id}/metrics")
    print(f"  control: {base}/instances  (Ctrl-C to stop)", flush=True)
    web.run_app(fleet.app(), host=args.host, port=args.port, print=None, access_log=None)
    return 0
