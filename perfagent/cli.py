"""`perfagent` command line: `serve`, `history`, `sim`, `rules`, `backtest` (and `--version`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from perfagent import __version__, backtest_cli, history_cli, rules_cli
from perfagent.errors import ConfigError
from perfagent.sim import cli as sim_cli

log = logging.getLogger("perfagent")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perfagent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"perfagent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the agent's HTTP API")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8002)")
    serve.add_argument("--db", type=Path, dest="db_path", help="DuckDB file (default data/perfagent.duckdb)")
    serve.add_argument("--config", type=Path, dest="config_file", help="YAML config file")
    serve.add_argument("--rules", type=Path, dest="rules_dir", help="directory of extra rule files")
    serve.add_argument(
        "--dev", action="store_true", default=None, help="development mode: allow any scrape target"
    )
    history_cli.add_parser(commands)
    sim_cli.add_parser(commands)
    rules_cli.add_parser(commands)
    backtest_cli.add_parser(commands)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from perfagent.app import create_app
    from perfagent.logs import setup_logging
    from perfagent.settings import load_settings

    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = load_settings(**overrides)
        setup_logging(settings.log_format, settings.log_level)
        app = create_app(settings)
        web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None)
    except ConfigError as exc:
        print(f"perfagent: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "history":
        return history_cli.run(args)
    if args.command == "sim":
        return sim_cli.run(args)
    if args.command == "rules":
        return rules_cli.run(args)
    if args.command == "backtest":
        return backtest_cli.run(args)
    return 2  # argparse rejects unknown commands before this


if __name__ == "__main__":
    sys.exit(main())
