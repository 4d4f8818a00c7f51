"""Shared fixtures: real network namespace labs and the ``root`` marker policy.

Tests marked ``@pytest.mark.root`` (or using the ``netlab`` fixture) need root.
Without root they are skipped - except when ``CI`` is true, where a skipped
namespace test would silently hide a regression, so they fail instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Test helper modules (netlab, servers) are imported by their plain names,
# whether or not tests/ is a package.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import netlab as _netlab  # noqa: E402
from pg_cluster import PostgresCluster, find_bindir  # noqa: E402

ROOT_REQUIRED_IN_CI = "root is required in CI"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require_root() -> None:
    """Skip the current test without root, or fail it when running in CI."""
    if os.geteuid() == 0:
        return
    if in_ci():
        pytest.fail(ROOT_REQUIRED_IN_CI, pytrace=False)
    pytest.skip("needs root (network namespaces)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None:
        require_root()


@pytest.fixture(scope="session", autouse=True)
def _sweep_stale_netlabs() -> None:
    """Remove namespaces left behind by earlier, crashed test runs (root only)."""
    if os.geteuid() == 0:
        _netlab.sweep_stale()


@pytest.fixture
def netlab() -> Iterator[_netlab.NetLab]:
    """A :class:`netlab.NetLab`, cleaned up after the test whatever happens."""
    require_root()
    with _netlab.NetLab() as lab:
        yield lab


def require_postgresql() -> Path:
    """Where PostgreSQL's programs are; skip without them, or fail in CI (.ci/run installs them)."""
    bindir = find_bindir()
    if bindir is None:
        message = "PostgreSQL is not installed (apt-get install postgresql: initdb, pg_ctl, psql)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return bindir


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL server for the whole session (no fsync: it is never killed); each test
    creates a database of its own in it."""
    with PostgresCluster(require_postgresql()) as cluster:  # stopped and removed on exit, also on failure
        yield cluster


@pytest.fixture(autouse=True)
def _close_kits() -> Iterator[None]:
    """Close the stores of every towerkit.Kit a test opened (see towerkit.OPEN_KITS)."""
    yield
    towerkit = sys.modules.get("towerkit")  # not imported: no Kit was built
    while towerkit is not None and towerkit.OPEN_KITS:
        towerkit.OPEN_KITS[-1].close()
