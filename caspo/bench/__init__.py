"""caspo-mesh benchmarks: ``caspo bench [--suite NAME] [--out DIR]`` (see docs/benchmarks.md), and
``python -m caspo.bench.dpo_sweep`` (one DPO round under several settings).

Every suite measures what it compares side by side in one run and reports ratios (these machines
are noisy), then writes ``<out>/<suite>.json``, ``<out>/<suite>.md`` and ``<out>/<suite>.png``.
"""
