"""The seed article's loop with separate processes, as in the article: verifier,
spamfilter, relay, submission and signer each on its own 127.0.0.x, talking SMTP,
a real DNS server (knot) and `poste srv` standing in for Gmail and Outlook."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from support.loop_world import (
    HOSTS,
    NAMES,
    Entry,
    World,
    check_confirmation,
    check_sealed,
    check_sent,
    metrics,
    run_scenario,
    sample,
    total,
    world,  # noqa: F401
)
from support.net import free_port, wait_port, wait_socket
from support.relay_env import common_port

pytestmark = pytest.mark.slow


def test_loop_separate_services(world: World) -> None:  # noqa: F811
    port = common_port(list(HOSTS.values()))  # one port for all, as port 25 in the article
    port_tls = free_port(HOSTS["submission"])
    h = HOSTS
    # Each process serves /metrics on its own address (every service's --metrics).
    mport = common_port(list(HOSTS.values()))
    metric_addr = {name: f"{ip}:{mport}" for name, ip in HOSTS.items()}

    # The sending path's hops are unix sockets: the relay lets what comes in on its local
    # socket go anywhere, and only our services can open the folder (an address on this
    # machine would prove nothing).  A short folder: a socket path has at most 108 bytes.
    sockets = Path(tempfile.mkdtemp(prefix="poste-sock-"))
    world.cleanups.append(lambda: shutil.rmtree(sockets, ignore_errors=True))
    relay_sock, signer_sock = sockets / "relay.sock", sockets / "signer.sock"

    def spawn(name: str, args: list[str]) -> None:
        world.spawn(name, [name, *args, "--hostname", NAMES[name],
                           "--metrics", metric_addr[name]])

    spawn("relay", [
        "--domain", "x25519.test", "--postmaster", "hostmaster@x25519.test",
        "--users", str(world.users), "--spool", str(world.tmp / "spool"),
        "--listen", f"{h['relay']}:{port}", "--nameserver", world.nameserver,
        "--smtp-port", str(world.smtp_port), "--no-ipv6", "--local-socket", str(relay_sock),
        # the domain's key, to seal forwarded mail over the verifier's results
        "--dkim-selector", "poste", "--dkim-key", str(world.dkim_key),
        "--arc-authserv-id", NAMES["verifier"],
    ])
    spawn("spamfilter", ["--listen", f"{h['spamfilter']}:{port}",
                         "--destination", f"{h['relay']}:{port}"])
    spawn("verifier", [
        "--domain", "x25519.test", "--postmaster", "hostmaster@x25519.test",
        "--destination", f"{h['spamfilter']}:{port}", "--listen", f"{h['verifier']}:{port}",
        "--tls-cert", str(world.cert), "--tls-key", str(world.key),
        "--nameserver", world.nameserver,
    ])
    spawn("signer", [
        "--domain", "x25519.test", "--selector", "poste", "--private-key", str(world.dkim_key),
        "--destination", f"unix:{relay_sock}", "--listen", f"unix:{signer_sock}",
    ])
    spawn("submission", [
        "--domain", "x25519.test", "--destination", f"unix:{signer_sock}",
        "--users", str(world.users), "--tls-cert", str(world.cert), "--tls-key", str(world.key),
        "--listen-tls", f"{h['submission']}:{port_tls}", "--listen", f"{h['submission']}:{port}",
    ])
    for name, ip in HOSTS.items():
        try:
            if name == "signer":
                wait_socket(signer_sock)
            else:
                wait_port(ip, port, timeout=30)
            wait_port(ip, mport, timeout=30)
        except TimeoutError:
            raise AssertionError(f"{name} did not start\n{world.logs()}") from None
    before = {name: metrics(addr) for name, addr in metric_addr.items()}

    confirmation, sent = run_scenario(
        world, Entry((h["verifier"], port), (h["submission"], port_tls), (h["submission"], port))
    )
    check_confirmation(confirmation)
    check_sealed(world, confirmation)
    check_sent(world, sent)

    # `curl http://127.0.0.x:PORT/metrics` of each service: its counter moved.
    after = {name: metrics(addr) for name, addr in metric_addr.items()}
    for name in HOSTS:
        got = sample(after[name], "poste_mails_total", service=name, result="accepted")
        was = sample(before[name], "poste_mails_total", service=name, result="accepted")
        assert got == was + (2 if name == "relay" else 1), (name, was, got)
    assert sum(v for (n, _), v in after["spamfilter"].items()
               if n == "poste_spam_labels_total") == 1
    # The verifier counts its own results and the relay its queue and deliveries, exactly as
    # under `poste up` (test_loop_up.py): one mail in, one mail out.
    def moved(name: str, metric: str, **labels: str) -> float:
        return total(after[name], metric, **labels) - total(before[name], metric, **labels)

    for method in ("spf", "dkim", "dmarc"):
        assert moved("verifier", "poste_auth_results_total", method=method) == 1, method
    assert moved("verifier", "poste_auth_results_total", method="spf", result="pass") == 1
    assert moved("relay", "poste_queued_total") == 2
    assert moved("relay", "poste_deliveries_total", result="delivered") == 2
    assert moved("relay", "poste_deliveries_total") == 2  # nothing deferred or bounced
    assert ("poste_spool_messages", ()) in after["relay"]
    assert ("poste_spool_oldest_age_seconds", ()) in after["relay"]
