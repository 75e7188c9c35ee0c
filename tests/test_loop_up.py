"""The seed's loop once more, against `poste up`: the same scenario and the same
headers as with separate services, all five chained in memory in one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.loop_world import (
    HOSTS,
    Entry,
    World,
    check_confirmation,
    check_sealed,
    check_sent,
    metrics,
    run_scenario,
    sample,
    total,
    up_config,
    world,  # noqa: F401
)
from support.net import free_port, wait_port
from support.relay_env import common_port

pytestmark = pytest.mark.slow


def uvloop_mapped(pid: int) -> bool:
    """Whether process `pid` runs on uvloop: its extension is mapped only when imported."""
    return "uvloop/loop." in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.parametrize("loop", ["", "asyncio"])
def test_loop_through_poste_up(world: World, loop: str) -> None:  # noqa: F811
    """The whole scenario on the default loop (uvloop) and on the opt-out, asyncio's own
    (POSTE_EVENT_LOOP=asyncio): the opt-out is proven end to end, not just named."""
    port = common_port([HOSTS["verifier"], HOSTS["submission"]])
    port_tls = free_port(HOSTS["submission"])
    metrics_addr = f"127.0.0.1:{free_port('127.0.0.1')}"
    config = up_config(world, port, port_tls,
                       top=f'metrics = "{metrics_addr}"\nlog-format = "json"\n')
    proc = world.spawn("up", ["up", "--config", str(config)],
                       env={"POSTE_EVENT_LOOP": loop} if loop else {})
    for host, p in ((HOSTS["verifier"], port), (HOSTS["submission"], port),
                    (HOSTS["submission"], port_tls)):
        try:
            wait_port(host, p, timeout=30)
        except TimeoutError:
            raise AssertionError(world.logs()) from None
    assert proc.poll() is None
    # the loop asked for is the one running
    assert uvloop_mapped(proc.pid) == (loop != "asyncio"), loop
    before = metrics(metrics_addr)

    confirmation, sent = run_scenario(
        world,
        Entry((HOSTS["verifier"], port), (HOSTS["submission"], port_tls),
              (HOSTS["submission"], port)),
    )
    check_confirmation(confirmation)
    check_sealed(world, confirmation)
    check_sent(world, sent)

    # The counters moved, as `curl http://ADDR/metrics` shows.
    after = metrics(metrics_addr)
    for service in ("verifier", "spamfilter", "relay", "submission", "signer"):
        name = "poste_mails_total"
        assert sample(after, name, service=service, result="accepted") == sample(
            before, name, service=service, result="accepted") + (2 if service == "relay" else 1), (
            service)
    # Each service counts for itself, once: the same series move as with separate services
    # (test_loop_separate.py), by exactly one mail in (auth results) and two queued/delivered.
    def moved(metric: str, **labels: str) -> float:
        return total(after, metric, **labels) - total(before, metric, **labels)

    for method in ("spf", "dkim", "dmarc"):
        assert moved("poste_auth_results_total", method=method) == 1, method
    assert moved("poste_auth_results_total", method="spf", result="pass") == 1
    assert moved("poste_spam_labels_total") == 1
    assert moved("poste_queued_total") == 2
    assert moved("poste_deliveries_total", result="delivered") == 2
    assert moved("poste_deliveries_total") == 2  # nothing deferred or bounced
    assert ("poste_spool_messages", ()) in after
    assert ("poste_spool_oldest_age_seconds", ()) in after
    # one JSON log line per mail per service, with the queue id
    import json

    lines = [json.loads(line) for line in (world.tmp / "up.log").read_text().splitlines()
             if line.startswith("{")]
    per_mail = [obj for obj in lines if "service" in obj and "queue_id" in obj
                and obj.get("code") == 250]
    assert {o["service"] for o in per_mail} >= {
        "verifier", "spamfilter", "relay", "submission", "signer"}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_unknown_event_loop_is_one_line(world: World, workers: str) -> None:  # noqa: F811
    """With workers, the parent says it, once, before any worker starts."""
    config = up_config(world, free_port(HOSTS["verifier"]), free_port(HOSTS["submission"]))
    proc = world.spawn("bad-loop", ["up", "--config", str(config), "--workers", workers],
                       env={"POSTE_EVENT_LOOP": "tokio"})
    assert proc.wait(timeout=60) == 1
    err = (world.tmp / "bad-loop.log").read_text()
    assert err.strip() == "Error: POSTE_EVENT_LOOP='tokio': choose one of uvloop, asyncio", err


def without_uvloop(world: World) -> dict[str, str]:  # noqa: F811
    """An environment in which `import uvloop` fails, as in an install without it: a
    package of that name first on the path, which raises ImportError."""
    shadow = world.tmp / "no-uvloop" / "uvloop"
    shadow.mkdir(parents=True, exist_ok=True)
    (shadow / "__init__.py").write_text('raise ImportError("no uvloop here")\n')
    return {"PYTHONPATH": str(shadow.parent)}


def test_uvloop_asked_for_but_missing_is_one_line(world: World) -> None:  # noqa: F811
    config = up_config(world, free_port(HOSTS["verifier"]), free_port(HOSTS["submission"]))
    proc = world.spawn("no-uvloop", ["up", "--config", str(config)],
                       env={**without_uvloop(world), "POSTE_EVENT_LOOP": "uvloop"})
    assert proc.wait(timeout=60) == 1
    err = (world.tmp / "no-uvloop.log").read_text()
    assert err.strip() == ("Error: POSTE_EVENT_LOOP=uvloop but uvloop is not installed"
                           " (pip install uvloop, or POSTE_EVENT_LOOP=asyncio)"), err


def test_default_without_uvloop_runs_on_asyncio(world: World) -> None:  # noqa: F811
    """Unset, and uvloop cannot be imported: poste serves on asyncio's loop, says so once."""
    port = free_port(HOSTS["verifier"])
    config = up_config(world, port, free_port(HOSTS["submission"]))
    proc = world.spawn("fallback", ["up", "--config", str(config)], env=without_uvloop(world))
    try:
        wait_port(HOSTS["verifier"], port, timeout=30)
    except TimeoutError:
        raise AssertionError(world.logs()) from None
    assert proc.poll() is None
    assert not uvloop_mapped(proc.pid)
    log = (world.tmp / "fallback.log").read_text()
    assert log.count("uvloop is not installed: running on asyncio's own event loop") == 1, log
