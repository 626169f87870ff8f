"""caspo-mesh benchmarks: ``caspo bench [--suite NAME] [--out DIR]`` (see docs/benchmarks.md). The
training-recipe study (``caspo sweep``) is ``caspo.trainer.sweep``.

Every suite measures what it compares side by side in one run and reports ratios (these machines
are noisy), then writes ``<out>/<suite>.json``, ``<out>/<suite>.md`` and ``<out>/<suite>.png``.
"""
