"""SMTP dialogues as data: one exchange per file in tests/dialogs/ (as chasquid's .cmy).

A file is read line by line against a live listener (the core with a mailbox
as next hop):

    # comment            ignored
    @ key=value ...      Limits for this dialogue (before the first line sent)
    C: text              send text + CRLF; \\r \\n \\t \\xNN are the bytes they name
    S: prefix            the next reply starts with prefix
    S~ text              the next reply contains text
    S! text              the last reply does not contain text (reads nothing)

The table of the core's own replies (poste.smtp.replies) is checked here too:
code and enhanced status agree, the core's modules write no reply outside
it, and each entry is shown by a dialogue or named with the test that shows it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from poste.smtp import replies
from poste.smtp.server import Limits
from support.smtp import LineClient, mailbox_server

DIALOGS = Path(__file__).parent / "dialogs"
SMTP_SRC = Path(__file__).resolve().parent.parent / "src" / "poste" / "smtp"

# Replies no dialogue can show (timing, TLS, a failing peer); each is shown by the test named.
SHOWN_ELSEWHERE = {
    "TOO_MANY_CONNECTIONS": "test_core_smtp.py::test_connection_cap, test_hardening_fairness.py",
    "TIMEOUT": "test_core_smtp.py::test_idle_timeout",
    "CONNECT_FAILED": "test_core_smtp.py::test_on_connect_sees_peer_before_greeting",
    "BAD_BASE64": "test_core_smtp.py::test_auth_only_under_tls_and_no_foreign_authzid",
    "BAD_AUTH_VALUE": "test_core_smtp.py::test_auth_only_under_tls_and_no_foreign_authzid",
    "FOREIGN_AUTHZID": "test_core_smtp.py::test_auth_only_under_tls_and_no_foreign_authzid",
    "TLS_FAILED": "test_core_smtp.py (STARTTLS tests)",
    "LOCAL_ERROR": "test_core_release.py (a stage that raises)",
    "HOP_UNAVAILABLE": "test_core_smtp.py::test_next_hop_down_gives_451",
}


def unescape(text: str) -> bytes:
    def one(m: re.Match[str]) -> str:
        s = m.group()
        return {"\\r": "\r", "\\n": "\n", "\\t": "\t", "\\\\": "\\"}.get(s) or chr(int(s[2:], 16))

    return re.sub(r"\\x[0-9a-fA-F]{2}|\\[rnt\\]", one, text).encode("utf-8", "surrogatepass")


def parse(path: Path) -> tuple[Limits, list[tuple[str, str]]]:
    limits: dict[str, int] = {}
    steps: list[tuple[str, str]] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not raw or raw.startswith("#"):
            continue
        if raw.startswith("@ "):
            for pair in raw[2:].split():
                key, _, value = pair.partition("=")
                limits[key] = int(value)
            continue
        kind, text = raw[:2], raw[3:] if len(raw) > 2 else ""
        assert kind in ("C:", "S:", "S~", "S!"), f"{path.name}: bad line {raw!r}"
        steps.append((kind, text))
    return Limits(**limits), steps  # type: ignore[arg-type]


@pytest.mark.parametrize("path", sorted(DIALOGS.glob("*.smtp")), ids=lambda p: p.stem)
async def test_dialog(path: Path, tmp_path: Path) -> None:
    limits, steps = parse(path)
    async with mailbox_server(tmp_path, limits=limits) as (service, _):
        client = await LineClient.connect(*service.sockname)
        last = ""
        try:
            for n, (kind, text) in enumerate(steps, 1):
                where = f"{path.name} step {n} ({kind} {text!r})"
                if kind == "C:":
                    await client.send(unescape(text) + b"\r\n")
                elif kind == "S!":
                    assert text not in last, f"{where}: got {last!r}"
                else:
                    last = await client.reply()
                    ok = last.startswith(text) if kind == "S:" else text in last
                    assert ok, f"{where}: got {last!r}"
        finally:
            await client.close()


def test_reply_table_is_consistent() -> None:
    assert replies.ALL, "the table is empty"
    for name, reply in replies.ALL.items():
        assert name.isupper(), name
        if reply.code // 100 == 3:  # 354 carries no enhanced code
            continue
        m = re.match(r"([245])\.(\d{1,3})\.(\d{1,3}) \S", reply.text)
        assert m, f"{name}: no enhanced status code in {reply.text!r}"
        assert int(m.group(1)) == reply.code // 100, f"{name}: {reply} (RFC 3463 class)"


def test_core_writes_no_reply_outside_the_table() -> None:
    literal = re.compile(r"[\"'][2-5]\d\d[ -][245]\.\d+\.\d+")
    reply_call = re.compile(r"Reply\(\s*\d{3}\s*,")
    found = []
    for path in sorted(SMTP_SRC.glob("*.py")):
        if path.name == "replies.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if literal.search(line) or reply_call.search(line):
                found.append(f"{path.name}:{n}: {line.strip()}")
    assert found == [], "\n".join(found)


def test_every_reply_is_shown() -> None:
    shown = " ".join(p.read_text(encoding="utf-8") for p in DIALOGS.glob("*.smtp"))
    missing = [name for name, reply in replies.ALL.items()
               if name not in SHOWN_ELSEWHERE and f"S: {reply}" not in shown
               and f"S: {reply.code} {reply.text.split()[0]}" not in shown]
    assert missing == [], f"no dialogue shows {missing}; add one, or name its test"
