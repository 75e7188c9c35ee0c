"""The AUTH brake against a real `poste submission` (issue 15, item 5: "Done when").

Clients are many loopback addresses: each connection binds its source to a
127.x.y.z address, so one test can be one attacker, thirty attackers in thirty
/24s, and the real user somewhere else.  AUTH PLAIN over implicit TLS (465).
Argon2id hashes use poste's own parameters (what a real repository holds).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from poste.smtp.tls import self_signed
from poste.users import passwords, store
from support.net import free_port, wait_port

DOMAIN = "our.test"
HOST = "127.0.0.1"
DELAY = 0.6  # every failure is answered this long after its check began
BUDGET = 10  # per client address; per account too
NET_BUDGET = 30


@dataclass
class Submission:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    state: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def failed_checks(self, ip: str | None = None) -> int:
        lines = [x for x in self.log_text().splitlines() if "auth failed" in x]
        return len([x for x in lines if ip is None or f"ip={ip} " in x])

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def add_user(repo: Path, local: str, stored: str) -> None:
    body = {"targets": [f"{local}@gmail.test"], "password": stored, "insecure": False}
    store.commit_file(repo, local, json.dumps(body).encode(), f"add {local}", create=True)


def start(poste_bin: str, base: Path, *extra: str, state: Path | None = None) -> Submission:
    port = free_port(HOST)
    log = base / f"submission-{port}.log"
    state = state or base / "auth-state.json"
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(
            [
                poste_bin,
                "submission",
                "--domain",
                DOMAIN,
                "--destination",
                f"{HOST}:1",  # AUTH only: nothing is sent on
                "--users",
                str(base / "users"),
                "--tls-cert",
                str(base / "cert.pem"),
                "--tls-key",
                str(base / "key.pem"),
                "--listen-tls",
                f"{HOST}:{port}",
                "--auth-delay",
                str(DELAY),
                "--auth-max-delay",
                str(DELAY),
                "--auth-max-failures",
                str(BUDGET),
                "--auth-net-failures",
                str(NET_BUDGET),
                "--auth-account-failures",
                str(BUDGET),
                "--auth-lockout",
                "3600",
                "--auth-state",
                str(state),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log_fh,
        )
    wait_port(HOST, port)
    return Submission(proc, port, log, state)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("brake")
    self_signed(base / "cert.pem", base / "key.pem", "mail.our.test")
    repo = base / "users"
    add_user(repo, "alice", passwords.hash_password("alice-pw"))
    add_user(repo, "target", passwords.hash_password("target-pw"))
    add_user(repo, "burst", passwords.hash_password("burst-pw"))
    add_user(repo, "ptt", passwords.blake2b_hex("ptt-pw"))
    add_user(repo, "nopass", "")
    return base


@pytest.fixture(scope="module")
def server(base: Path, poste_bin: str) -> Iterator[Submission]:
    sub = start(poste_bin, base)
    try:
        yield sub
    finally:
        sub.stop()


_CTX = ssl.create_default_context()
_CTX.check_hostname = False
_CTX.verify_mode = ssl.CERT_NONE


async def _reply(reader: asyncio.StreamReader) -> str:
    lines = []
    while True:
        line = (await asyncio.wait_for(reader.readline(), 60)).decode(errors="replace")
        if not line:
            raise ConnectionError("closed: " + "".join(lines))
        lines.append(line.rstrip("\r\n"))
        if len(line) < 4 or line[3] != "-":
            return "\n".join(lines)


REFUSED_AT_CONNECT = 0  # the listener's per-address share was full: closed before TLS


async def auth(port: int, source: str, user: str, password: str) -> tuple[int, float]:
    """One connection from `source`: AUTH PLAIN; (reply code, seconds AUTH took).

    A connection the listener closes before the TLS handshake (more than an
    address's share of connections at once, smtp/admission.py) checked no
    password: it counts as REFUSED_AT_CONNECT.
    """
    try:
        reader, writer = await asyncio.open_connection(
            HOST, port, ssl=_CTX, server_hostname="mail.our.test", local_addr=(source, 0)
        )
    except (ConnectionError, ssl.SSLError):
        return REFUSED_AT_CONNECT, 0.0
    try:
        await _reply(reader)
        writer.write(b"EHLO client.test\r\n")
        assert "AUTH" in await _reply(reader)
        blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        began = time.monotonic()
        writer.write(f"AUTH PLAIN {blob}\r\n".encode())
        answer = await _reply(reader)
        took = time.monotonic() - began
        writer.write(b"QUIT\r\n")
        return int(answer[:3]), took
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


def code(port: int, source: str, user: str, password: str) -> int:
    return asyncio.run(auth(port, source, user, password))[0]


def test_sixty_parallel_attempts_from_one_address_check_at_most_the_budget(
    server: Submission,
) -> None:
    attacker, clean = "127.0.0.20", "127.0.0.21"

    async def burst() -> list[int]:
        tries = [auth(server.port, attacker, "burst", f"guess-{i}") for i in range(60)]
        return [c for c, _ in await asyncio.gather(*tries)]

    codes = asyncio.run(burst())
    assert len(codes) == 60 and set(codes) <= {535, 454, REFUSED_AT_CONNECT}, codes
    checked = codes.count(535)
    assert 1 <= checked <= BUDGET, codes
    assert server.failed_checks(attacker) == checked  # one log line per checked guess
    print(f"60 parallel: {checked} checked, {codes.count(454)} refused unchecked, "
          f"{codes.count(REFUSED_AT_CONNECT)} refused at connect")
    # guessing on, one at a time: checked until the budget, then refused unchecked
    more = [code(server.port, attacker, "burst", f"more-{i}") for i in range(BUDGET - checked + 2)]
    assert more == [535] * (BUDGET - checked) + [454, 454]
    assert server.failed_checks(attacker) == BUDGET
    # the right password from the attacker's address is refused too, unchecked
    assert code(server.port, attacker, "burst", "burst-pw") == 454
    # the account is not locked: its user, from a clean address, logs in
    assert code(server.port, clean, "burst", "burst-pw") == 235
    assert "burst-pw" not in server.log_text()


def test_thirty_addresses_times_ten_guesses_are_locked_out(server: Submission) -> None:
    attackers = [f"127.{100 + i}.0.1" for i in range(30)]  # 30 addresses in 30 /24s

    async def attack() -> dict[str, list[int]]:
        async def one(ip: str) -> list[int]:
            return [(await auth(server.port, ip, "target", f"g{n}"))[0] for n in range(10)]

        results = await asyncio.gather(*(one(ip) for ip in attackers))
        return dict(zip(attackers, results, strict=True))

    results = asyncio.run(attack())
    checked = sum(codes.count(535) for codes in results.values())
    # 300 guesses; checked: the account's budget, then one per fresh address at most
    assert checked <= BUDGET + len(attackers), checked
    assert all(codes[-1] == 454 for codes in results.values()), results
    assert all(set(codes) <= {535, 454} for codes in results.values())
    # the real user: from a clean address it works, from an attacker's address it does not
    assert code(server.port, "127.0.0.22", "target", "target-pw") == 235
    assert code(server.port, attackers[0], "target", "target-pw") == 454
    print(f"30 x 10 guesses: {checked} checked, {300 - checked} refused unchecked")


def test_a_user_behind_the_attackers_address_still_logs_in(server: Submission) -> None:
    nat = "127.131.0.1"
    assert code(server.port, nat, "alice", "alice-pw") == 235  # alice's usual address
    # an attacker behind the same address burns its budget on other logins
    codes = [code(server.port, nat, f"nobody{i}", "x") for i in range(BUDGET + 1)]
    assert codes == [535] * BUDGET + [454]
    assert code(server.port, nat, "target", "target-pw") == 454  # the address is locked out
    assert code(server.port, nat, "alice", "alice-pw") == 235  # but alice there is known


def test_failure_time_does_not_depend_on_the_account(server: Submission) -> None:
    kinds = {
        "argon2id": ("alice", "wrong"),
        "blake2b": ("ptt", "wrong"),
        "unknown": ("nobody-here", "wrong"),
        "no password": ("nopass", "wrong"),
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}

    async def measure() -> None:
        for i in range(8):  # round robin: load drifts hit every kind alike
            for k, (kind, (user, password)) in enumerate(kinds.items()):
                # a fresh address in its own /24 each time: every try is a first failure
                answer, took = await auth(server.port, f"127.{200 + k}.{i}.1", user, password)
                assert answer == 535
                times[kind].append(took)

    asyncio.run(measure())
    medians = {kind: statistics.median(t) for kind, t in times.items()}
    print("median failure time:", {k: f"{v * 1000:.0f} ms" for k, v in medians.items()})
    assert max(medians.values()) - min(medians.values()) < 0.05, medians
    assert min(medians.values()) >= DELAY


def test_counters_survive_a_crash(base: Path, poste_bin: str) -> None:
    state = base / "crash-state.json"
    sub = start(poste_bin, base, state=state)
    attacker = "127.0.0.40"
    try:
        codes = [code(sub.port, attacker, "alice", f"x{i}") for i in range(BUDGET)]
        assert codes == [535] * BUDGET
    finally:
        sub.stop(kill=True)  # SIGKILL right after the last answer
    saved = json.loads(state.read_text())
    assert attacker in saved["address"]
    again = start(poste_bin, base, state=state)
    try:
        assert code(again.port, attacker, "alice", "alice-pw") == 454
        assert again.failed_checks() == 0
        assert re.search(r"auth refused ip=127\.0\.0\.40 .*address", again.log_text())
        assert code(again.port, "127.0.0.41", "alice", "alice-pw") == 235
    finally:
        again.stop()
    assert again.proc.returncode == 0


async def test_state_rewritten_only_when_it_changes(tmp_path: Path) -> None:
    """A login of a known pair charges and refunds in one moment: the file stays as it is;
    a first login and a failure are written."""
    from poste.services.submission.brake import AuthBrake

    state = tmp_path / "auth.json"
    brake = AuthBrake(state_file=state)

    async def login(ok: bool) -> None:
        async with brake.gate("192.0.2.7"):
            ticket = brake.admit("192.0.2.7", "alice")
            if ok:
                brake.success(ticket)
            else:
                brake.failure(ticket)
        await brake.flush()

    await login(True)
    first = state.read_bytes()  # with its "saved" time: any rewrite changes it
    for _ in range(5):
        await login(True)
    assert state.read_bytes() == first
    await login(False)
    assert state.read_bytes() != first
    assert json.loads(state.read_bytes())["address"]
