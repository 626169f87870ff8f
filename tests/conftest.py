"""Options shared by every test directory.

``--long`` switches tests/reliability to its long mode (64 clients for 60 s, many more fuzz examples,
longer fault runs); ``make test`` runs the fast mode. ``CASPO_LONG=1`` does the same as ``--long``.

The model named ``tiny`` is, for the whole suite, the first built-in reasoner (tests/data/tiny-v1, 0.66
greedy accuracy): a CASPO round on a handful of questions needs a policy that errs on some of them,
and the shipped one errs on about 4 in 1,000. It is put in a temporary ``CASPO_HOME`` (where a user's
own ``tiny`` goes, ``caspo.models.tiny.resolve_tiny``) before anything starts Ray or a subprocess, so
every Ray worker and CLI the tests start inherits it. tests/unit/test_shipped_tiny.py checks the
shipped weights.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

TEST_TINY = Path(__file__).parent / "data" / "tiny-v1"


def _suite_caspo_home() -> str:
    home = tempfile.mkdtemp(prefix="caspo-home-")
    atexit.register(shutil.rmtree, home, True)
    shutil.copytree(TEST_TINY, Path(home) / "tiny")
    return home


os.environ["CASPO_HOME"] = _suite_caspo_home()


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False, help="run tests/reliability in its long mode")


@pytest.fixture(scope="session")
def long_mode(request) -> bool:
    """True in the reliability suite's long mode (``pytest --long`` or ``CASPO_LONG=1``)."""
    return bool(request.config.getoption("--long") or os.environ.get("CASPO_LONG") == "1")
