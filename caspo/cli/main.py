"""The ``caspo`` command: one parser wired from the command groups, each of which adds its subcommands
(``add_parser``) and runs them; errors of bad input exit 2 with one line."""

from __future__ import annotations

import argparse
import logging
import sys

from caspo.cli import cmd_bench, cmd_eval, cmd_loop, cmd_mesh, cmd_models, cmd_serve
from caspo.cli.shared import EXIT_USAGE
from caspo.config import ConfigError
from caspo.errors import UsageError
from caspo.models.base import ModelLoadError
from caspo.models.calibration_file import CalibrationError
from caspo.tasks.base import TaskError

# in the order ``caspo --help`` lists them
GROUPS = (cmd_eval, cmd_models, cmd_mesh, cmd_loop, cmd_serve, cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caspo", description="CASPO training and CaT inference on a Ray service mesh")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser (caspo/bench/run.py), so `caspo bench --help` lists its options
        return cmd_bench.run(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (UsageError, TaskError, ModelLoadError, ConfigError, CalibrationError) as e:
        print(f"caspo: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("caspo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
