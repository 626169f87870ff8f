"""``caspo bench``: the benchmark suites, with their own parser (``caspo.bench.run``) so that
``caspo bench --help`` lists their options."""

from __future__ import annotations

from caspo.bench.run import main as bench_main


def add_parser(sub) -> None:
    """The bench subcommand; ``main`` hands its arguments to :func:`run` before any parsing."""
    sub.add_parser("bench", help="benchmarks: CaT vs greedy vs SC at equal budget, overheads, mesh and Serve throughput (caspo bench --help)", add_help=False)


def run(argv: list[str]) -> int:
    return bench_main(argv)
