from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def poste_bin() -> str:
    """The installed `poste` entry point (the one a user runs)."""
    exe = Path(sys.executable).parent / "poste"
    if exe.exists():
        return str(exe)
    found = shutil.which("poste")
    assert found, "poste is not installed (pip install -e .)"
    return found


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return Path(os.environ.get("POSTE_SHARED", SHARED))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under scripts/test (POSTE_REQUIRE_ALL=1) a skipped test is a failure.

    Tests skip when a Debian tool (swaks, knotd, opendkim-testmsg...) is
    missing, which is handy on a developer's laptop; in CI it would hide that
    nothing was proven, so there every skip fails the run.
    """
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("POSTE_REQUIRE_ALL") == "1":
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under POSTE_REQUIRE_ALL=1: {reason}"
