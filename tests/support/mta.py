"""A receiving provider on loopback: Postfix with OpenDKIM and OpenDMARC as milters.

The destination MX the issue asks for: Debian's postfix, opendkim (verify
mode) and opendmarc, each a private instance with its own files under a test
folder, on loopback ports, never the machine's own services.  Postfix
accepts mail for `domain` on `host:port`, the milters add their
Authentication-Results (authserv-id `mx.<domain>`), and Postfix relays the
mail to `deliver_to` (a stand-in), where the test reads what the provider
concluded.

DNS: opendmarc (and libspf2 in it) use the libc resolver, which reads
/etc/resolv.conf and asks port 53 only, so the three run in a private mount
namespace (`unshare -m`, root) whose /etc/resolv.conf names the test's knot
(on port 53 of a loopback address of its own, support/opendkim.port53_host).
OpenDKIM resolves with libunbound, which is told to forward everything there
and not to answer `.test` names itself (`local-zone: "test." nodefault`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import publicsuffixlist

from support.net import free_port, wait_port

POSTFIX = "/usr/sbin/postfix"
OPENDKIM = "/usr/sbin/opendkim"
OPENDMARC = "/usr/sbin/opendmarc"


def available() -> bool:
    """postfix, opendkim and opendmarc are installed and we may make a mount namespace."""
    if not all(Path(p).exists() for p in (POSTFIX, OPENDKIM, OPENDMARC)):
        return False
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0


_MASTER = """\
{listen} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


def _main_cf(work: Path, domain: str, deliver_to: tuple[str, int], milters: list[int]) -> str:
    host, port = deliver_to
    return "\n".join([
        "compatibility_level = 3.6",
        f"queue_directory = {work}/queue",
        f"data_directory = {work}/data",
        f"maillog_file = {work}/maillog",
        f"maillog_file_prefixes = {work}",
        "mail_owner = postfix",
        "setgid_group = postdrop",
        "inet_protocols = ipv4",
        f"myhostname = mx.{domain}",
        f"mydomain = {domain}",
        "mydestination =",
        "local_recipient_maps =",
        "alias_maps =",
        "alias_database =",
        f"relay_domains = {domain}",
        f"transport_maps = inline:{{{domain}=smtp:[{host}]:{port}}}",
        "smtp_dns_support_level = disabled",
        "mynetworks = 127.0.0.0/8",
        "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
        "smtpd_milters = " + ", ".join(f"inet:127.0.0.1:{p}" for p in milters),
        "non_smtpd_milters =",
        "milter_default_action = tempfail",
        "biff = no",
        "append_dot_mydomain = no",
        "",
    ])


def _opendkim_conf(work: Path, domain: str, port: int) -> str:
    return "\n".join([
        "Mode v",
        f"Socket inet:{port}@127.0.0.1",
        f"PidFile {work}/opendkim.pid",
        f"AuthservID mx.{domain}",
        "AlwaysAddARHeader yes",
        f"ResolverConfiguration {work}/unbound.conf",
        "Syslog no",
        "",
    ])


def _unbound_conf(ns_host: str) -> str:
    return "\n".join([
        "server:",
        "  do-not-query-localhost: no",
        '  local-zone: "test." nodefault',
        "forward-zone:",
        '  name: "."',
        f"  forward-addr: {ns_host}@53",
        "",
    ])


def _opendmarc_conf(work: Path, domain: str, port: int) -> str:
    psl = Path(publicsuffixlist.__file__).with_name("public_suffix_list.dat")
    return "\n".join([
        f"Socket inet:{port}@127.0.0.1",
        f"PidFile {work}/opendmarc.pid",
        f"AuthservID mx.{domain}",
        f"TrustedAuthservIDs mx.{domain}",
        # its default skips mail from 127.0.0.1, where every test client connects from
        f"IgnoreHosts {work}/ignore-hosts",
        f"PublicSuffixList {psl}",
        "SPFSelfValidate true",
        "SPFIgnoreResults true",
        "IgnoreAuthenticatedClients false",
        "RejectFailures false",
        "FailureReports false",
        "Syslog false",
        "",
    ])


@contextlib.contextmanager
def receiving_mta(
    work: Path, domain: str, host: str, port: int, deliver_to: tuple[str, int], ns_host: str
) -> Iterator[Path]:
    """Run the provider's MX for `domain` on host:port until the block ends; yields its maillog.

    Postfix works as its own user (`postfix`) in its data directory, which
    pytest's private temporary tree (mode 0700) would not let it reach, so
    the instance lives in a folder of its own under /tmp (0755, removed at
    the end) and `work` (e.g. tmp_path / "mta") becomes a symlink to it while it runs.
    """
    log_link = work
    work = Path(tempfile.mkdtemp(prefix="poste-mta-", dir="/tmp"))
    os.chmod(work, 0o755)
    log_link.parent.mkdir(parents=True, exist_ok=True)
    log_link.symlink_to(work)
    milters = [free_port("127.0.0.1"), free_port("127.0.0.1")]
    (work / "main.cf").write_text(_main_cf(work, domain, deliver_to, milters))
    (work / "master.cf").write_text(_MASTER.format(listen=f"{host}:{port}"))
    (work / "opendkim.conf").write_text(_opendkim_conf(work, domain, milters[0]))
    (work / "unbound.conf").write_text(_unbound_conf(ns_host))
    (work / "opendmarc.conf").write_text(_opendmarc_conf(work, domain, milters[1]))
    (work / "ignore-hosts").write_text("192.0.2.255\n")
    (work / "resolv.conf").write_text(f"nameserver {ns_host}\noptions attempts:2 timeout:2\n")
    (work / "queue").mkdir(exist_ok=True)
    (work / "data").mkdir(exist_ok=True)
    os.chown(work / "data", *_postfix_ids())
    # Each daemon in the foreground (so stopping it is a signal to the one process we
    # started), in a mount namespace whose /etc/resolv.conf names the test's DNS server.
    script = (
        f'mount --bind "{work}/resolv.conf" /etc/resolv.conf && '
        f'"{POSTFIX}" -c "{work}" check && '
        f'("{OPENDKIM}" -f -x "{work}/opendkim.conf" & '
        f' "{OPENDMARC}" -f -c "{work}/opendmarc.conf" & '
        f' exec "{POSTFIX}" -c "{work}" start-fg)'
    )
    log = open(work / "daemons.log", "wb")
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], stdout=log, stderr=log,
                            start_new_session=True)
    log.close()
    try:
        for p in milters:
            wait_port("127.0.0.1", p, timeout=20)
        wait_port(host, port, timeout=20)
        yield work / "maillog"
    finally:
        # start-fg runs `master -s`, which makes itself a session leader: it is not in
        # our process group, so it is stopped by the pid it wrote (before, a few masters
        # outlived their tests, in a deleted folder).
        master = _master_pid(work)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        if master is not None:
            _stop_master(master)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _wait_group_gone(proc.pid)
        shutil.rmtree(log_link.resolve(), ignore_errors=True)
        log_link.unlink()


def _postfix_ids() -> tuple[int, int]:
    import pwd

    pw = pwd.getpwnam("postfix")
    return pw.pw_uid, pw.pw_gid


def _master_pid(work: Path) -> int | None:
    try:
        return int((work / "queue" / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_master(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM to Postfix's master (it stops its children, then itself); SIGKILL to its
    group if it is still there after `timeout`."""
    import time

    try:
        if b"master" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return  # gone, and the pid taken by another process
        os.kill(pid, signal.SIGTERM)
    except (OSError, ProcessLookupError):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Postfix's master stops its children on SIGTERM; wait until none of the group is left."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
