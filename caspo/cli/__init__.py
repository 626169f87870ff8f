"""The ``caspo`` command (``caspo.cli.main``): one module per command group, each adding its subcommands
and running them (cmd_eval: eval, diagnose, calibrate; cmd_models: train-base, train-chat, check-data,
check-answers; cmd_mesh: up, plan, status, down; cmd_loop: demo, generate-pairs, loop, report, sweep;
cmd_serve: serve, solve, promote, rollback; cmd_bench: bench), and what they share (shared)."""

