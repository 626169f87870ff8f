"""caspo-mesh benchmarks: ``caspo bench [--suite NAME] [--out DIR]`` (see docs/benchmarks.md), and
``caspo sweep`` (caspo.bench.sweep: one CASPO round per training recipe, judged on held-out problems).

Every suite measures what it compares side by side in one run and reports ratios (these machines
are noisy), then writes ``<out>/<suite>.json``, ``<out>/<suite>.md`` and ``<out>/<suite>.png``.
"""
