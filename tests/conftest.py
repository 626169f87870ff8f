"""Options shared by every test directory.

``--long`` switches tests/reliability to its long mode (64 clients for 60 s, many more fuzz examples,
longer fault runs); ``make test`` runs the fast mode. ``CASPO_LONG=1`` does the same as ``--long``.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False, help="run tests/reliability in its long mode")


@pytest.fixture(scope="session")
def long_mode(request) -> bool:
    """True in the reliability suite's long mode (``pytest --long`` or ``CASPO_LONG=1``)."""
    return bool(request.config.getoption("--long") or os.environ.get("CASPO_LONG") == "1")
