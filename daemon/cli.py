"""The ``armguard`` command line.

Every subcommand builds the settings once and hands each component its slice. Exit codes: 0 ok,
1 runtime failure, 2 bad usage or invalid configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ArmguardError, ConfigError, ConfigProblem

__all__ = ["build_parser", "main"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("armguard")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="armguard",
        description=(
            "Kafka-native guardrail daemon for production experiments: anytime-valid tests, "
            "drift and anomaly detection per arm, kill switch on Kafka."
        ),
    )
    parser.add_argument("--version", action="version", version=f"armguard {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "check-config",
        help="validate settings and experiment files",
        description=(
            "Validate settings and experiment YAML files. A file with a top-level `experiments:` "
            "list is an experiments file; any other is a settings file. Every problem is printed "
            "with the file, experiment, field and what is allowed; exit code 2 if any."
        ),
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.set_defaults(handler=_check_config)

    p = sub.add_parser(
        "run",
        help="run the daemon (ingest, evaluate, metrics/health HTTP)",
        description=(
            "Run armguard: the ingest and evaluate stages (each can be disabled in the settings) "
            "and the HTTP server for /metrics, /healthz and /readyz. SIGTERM stops it cleanly."
        ),
    )
    p.add_argument("--settings", type=Path, help="YAML settings file (environment overrides it)")
    p.add_argument("--experiments", type=Path, help="experiments YAML (overrides the settings)")
    p.set_defaults(handler=_run)

    from . import operator, replay, simulate_sinks

    operator.add_parsers(sub)
    replay.add_parser(sub)
    simulate_sinks.add_parser(sub)
    return parser


def _check_config(args: argparse.Namespace) -> int:
    import yaml

    from .experiments import load_experiments
    from .settings import load_settings

    problems: list[ConfigProblem] = []
    for path in args.files:
        try:
            is_experiments = False
            if path.is_file():
                try:
                    data = yaml.load(
                        path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
                    )
                except yaml.YAMLError:
                    data = None
                # Settings have no `experiments` key; an empty file is reported as such.
                is_experiments = data is None or (isinstance(data, dict) and "experiments" in data)
            if is_experiments or not path.is_file():
                if not path.is_file():
                    raise ConfigError([ConfigProblem(str(path), "", "file not found")])
                exps = load_experiments(path)
                n = sum(len(e.guardrails) for e in exps.experiments)
                print(
                    f"{path}: ok: {len(exps.experiments)} experiment(s), {n} guardrail(s), "
                    f"config version {exps.version}"
                )
            else:
                load_settings(path)
                print(f"{path}: ok: settings")
        except ConfigError as exc:
            problems.extend(exc.problems)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 2 if problems else 0


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from .app import Daemon
    from .experiments import load_experiments
    from .settings import load_settings

    overrides = {"experiments_file": args.experiments} if args.experiments else {}
    settings = load_settings(args.settings, **overrides)
    experiments = load_experiments(settings.experiments_file)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    async def serve() -> None:
        daemon = Daemon(settings, experiments)
        daemon.install_signal_handlers()
        await daemon.run()

    asyncio.run(serve())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        for p in exc.problems:
            print(f"error: {p}", file=sys.stderr)
        return exc.exit_code
    except ArmguardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
