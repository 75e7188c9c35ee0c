from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

# `poste spam classify` keeps weight tables in $XDG_CACHE_HOME/poste (spam/weights_cache.py):
# the tests' commands write theirs in a folder of this session, never in the user's home
_OWN_CACHE = ""
if "POSTE_TEST_CACHE" not in os.environ:  # xdist workers inherit the controller's
    import tempfile

    _OWN_CACHE = tempfile.mkdtemp(prefix="poste-test-cache.")
    os.environ["POSTE_TEST_CACHE"] = os.environ["XDG_CACHE_HOME"] = _OWN_CACHE


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

# One process per command, as before `--workers` (whose default is one per core): the
# suite's tests mean what they meant; tests/test_workers.py asks for 2 explicitly.
os.environ["POSTE_WORKERS"] = "1"

_PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config: pytest.Config) -> None:
    """Make this pytest process the reaper of everything its tests start.

    A process a test forgot (or a daemon that forked away from its parent)
    is then re-parented to pytest instead of init, so the check at the end
    of the session still finds it among pytest's descendants.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the check sees direct descendants only
        pass


# Every subprocess.Popen (asyncio's subprocesses included) made while a test body runs.
_body_processes: list[subprocess.Popen[Any]] | None = None
_popen_init = subprocess.Popen.__init__


def _tracking_init(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
    _popen_init(self, *args, **kwargs)
    if _body_processes is not None:
        _body_processes.append(self)


subprocess.Popen.__init__ = _tracking_init  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    global _body_processes
    _body_processes = []
    try:
        return (yield)
    finally:
        item.stash[_STARTED] = _body_processes
        _body_processes = None


_STARTED = pytest.StashKey[list[subprocess.Popen[Any]]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """A process the test body started and nothing stopped is killed now, and is an error.

    Processes belong to fixtures, whose teardown stops them whether the test
    passed, failed or timed out; one started in the test body and still
    running after the teardown would outlive the suite (the issue saw a
    `poste srv` from a failed test still running ten minutes later).
    """
    result = yield
    left = []
    for proc in item.stash.get(_STARTED, []):
        try:
            proc.wait(timeout=2)  # one that is about to end by itself is fine
            continue
        except subprocess.TimeoutExpired:
            pass
        cmd = proc.args
        args = " ".join(map(str, cmd)) if isinstance(cmd, list | tuple) else str(cmd)
        left.append(f"pid {proc.pid}: {args[:200]}")
        proc.kill()
        proc.wait()
    if left:
        raise AssertionError(
            "the test left processes running (killed now; start them in a fixture that "
            "stops them): " + "; ".join(left)
        )
    return result


def _descendants(root: int) -> dict[int, str]:
    """Live descendants of `root` (pid -> command line), read from /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields and fields[0] != "Z":  # zombies are already dead
            parent[int(entry)] = int(fields[1])
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, ppid in parent.items():
            if ppid == pid and child not in found:
                try:
                    cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                except OSError:
                    continue
                found[child] = cmd.decode(errors="replace").strip()
                frontier.append(child)
    return found


def _python_helpers(cmd: str) -> bool:
    """multiprocessing's own helpers (resource tracker, forkserver) end with the interpreter."""
    return "from multiprocessing" in cmd


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The suite leaves no process behind: kill and report what the tests left running.

    Every process a test starts belongs to a fixture that stops it; this is
    the safety net for a test that fails or times out half-way.  Leftovers
    fail the run, so a leak is seen and fixed instead of piling up.
    """
    left = {p: c for p, c in _descendants(os.getpid()).items() if not _python_helpers(c)}
    if not left:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(
            p in _descendants(os.getpid()) for p in left
        ):
            time.sleep(0.05)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:  # reap what we were handed as subreaper
                pass
        except ChildProcessError:
            pass
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"tests left {len(left)} process(es) running; killed them:"]
    lines += [f"  pid {pid}: {cmd[:200]}" for pid, cmd in sorted(left.items())]
    if reporter is not None:
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line, red=True, bold=True)
    else:
        print("\n".join(lines), file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def poste_bin() -> str:
    """The installed `poste` entry point (the one a user runs)."""
    exe = Path(sys.executable).parent / "poste"
    if exe.exists():
        return str(exe)
    found = shutil.which("poste")
    assert found, "poste is not installed (pip install -e .)"
    return found


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


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """pytest-asyncio's loop for the in-process async tests: the one the serving processes
    run on (runtime/event_loop.py), uvloop unless POSTE_EVENT_LOOP=asyncio."""
    if os.environ.get("POSTE_EVENT_LOOP", "").strip().lower() == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    import uvloop

    return {"uvloop": uvloop.new_event_loop}
