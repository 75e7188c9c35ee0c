"""Our relay with the domain's DKIM key, and a real provider's MX after it.

The mail poste writes itself (DSNs, quarantine digests) must pass DKIM and
DMARC where users read it: here the provider is Postfix with the OpenDKIM and
OpenDMARC milters (support/mta.py) as example.org's MX, and what they
concluded reaches the stand-in mailbox behind it in Authentication-Results.
knot serves our.test (SPF, DMARC p=reject, the DKIM key) and example.org.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from support import mta, opendkim
from support.dkimkit import dkim_zone_records, make_key
from support.knot import knot_server, simple_zone
from support.net import free_port
from support.relay_env import Relay, header
from support.standin import StandIn, StandIns

PFX_IP, BEHIND_IP = "127.0.0.31", "127.0.0.32"  # the Postfix MX, the mailbox behind it

OURS = (
    '@ TXT "v=spf1 mx -all"\n'
    'relay TXT "v=spf1 ip4:127.0.0.1 -all"\n'
    '_dmarc TXT "v=DMARC1; p=reject; rua=mailto:postmaster@our.test"\n'
)


@dataclass
class World:
    relay: Relay
    box: StandIn
    maillog: Path

    def wait_one(self) -> bytes:
        """The one mail that reached the mailbox behind Postfix (with the logs if none did)."""
        try:
            [mail] = self.box.wait(1)
        except TimeoutError:
            raise AssertionError(self.maillog.read_text(errors="replace")[-3000:]
                                 + self.relay.log()) from None
        return mail


@contextlib.contextmanager
def relay_before_postfix(tmp_path: Path, poste_bin: str, more_zones: dict[str, str] | None = None
                         ) -> Iterator[World]:
    """Run knot, the Postfix MX with its milters, the mailbox and our relay (users from
    tmp_path / "users", which the caller makes) until the block ends."""
    key_path, key = make_key(tmp_path, "rsa", "poste")
    zones = {
        "our.test": simple_zone("our.test", OURS + dkim_zone_records([("poste", key)])),
        "example.org": simple_zone("example.org", f"@ MX 10 mx.example.org.\nmx A {PFX_IP}\n"),
        **(more_zones or {}),
    }
    port = free_port(PFX_IP)
    with knot_server(tmp_path / "knot", zones, host=opendkim.port53_host(), port=53) as ns, \
            StandIns([BEHIND_IP]) as behind:
        box = behind.start(BEHIND_IP, tmp_path / "behind")
        with mta.receiving_mta(tmp_path / "pfx", "example.org", PFX_IP, port,
                               (BEHIND_IP, behind.port), ns.host) as maillog:
            relay = Relay(poste_bin, tmp_path, ns.nameserver, port,
                          "--dkim-selector", "poste", "--dkim-key", str(key_path)).start()
            try:
                yield World(relay, box, maillog)
            finally:
                relay.stop()


def assert_ours_and_aligned(mail: bytes) -> None:
    """What OpenDKIM, OpenDMARC and libspf2 concluded of a mail our relay wrote itself."""
    results = " ".join(header(mail, "Authentication-Results"))
    assert "mx.example.org; dkim=pass" in results and "header.d=our.test" in results, results
    assert "mx.example.org; dmarc=pass (p=reject dis=none) header.from=our.test" in results, results
    assert "mx.example.org; spf=pass smtp.helo=relay.our.test" in results, results
