"""Crafted mails and small trained databases for the spam classifier tests.

The corpus is synthetic (seeded), so the tests never depend on the big
SpamAssassin corpus and run in well under a second.
"""

from __future__ import annotations

import random
from pathlib import Path

from poste.spam.database import Database
from poste.spam.tokenizer import tokenize

SPAM_WORDS = (
    "viagra cheap pills winner lottery money free offer click unsubscribe million dollars "
    "casino guaranteed investment refinance mortgage credit limited act now bonus prize "
    "discount pharmacy rolex replica weight loss earn income opportunity"
).split()
HAM_WORDS = (
    "meeting agenda patch review kernel build tomorrow lunch report python release "
    "thanks regards branch merge tests schedule minutes project draft comments budget "
    "deadline slides conference paper compiler debian package upstream bugfix"
).split()
COMMON = "the and for you this that with have from your are will our can all".split()


def mail(
    subject: str,
    body: str,
    sender: str = "Alice <alice@example.org>",
    extra: str = "",
    eol: str = "\r\n",
) -> bytes:
    head = [
        f"From: {sender}",
        "To: bob@example.net",
        f"Subject: {subject}",
        "Date: Mon, 1 Jan 2024 10:00:00 +0000",
        "Message-ID: <1@example.org>",
        "MIME-Version: 1.0",
    ]
    if extra:
        head.extend(extra.strip("\n").split("\n"))
    else:
        head.append("Content-Type: text/plain; charset=utf-8")
    return (eol.join(head) + eol + eol + body.replace("\n", eol)).encode("utf-8")


def spammy(rng: random.Random, n: int = 30) -> bytes:
    words = rng.choices(SPAM_WORDS, k=n) + rng.choices(COMMON, k=n // 2)
    rng.shuffle(words)
    subj = " ".join(rng.choices(SPAM_WORDS, k=3)).upper() + "!!!"
    return mail(subj, " ".join(words) + "\n", sender="Deals <deals@bulk-offers.example>")


def hammy(rng: random.Random, n: int = 30) -> bytes:
    words = rng.choices(HAM_WORDS, k=n) + rng.choices(COMMON, k=n // 2)
    rng.shuffle(words)
    subj = "Re: " + " ".join(rng.choices(HAM_WORDS, k=3))
    return mail(subj, " ".join(words) + "\n")


def corpus(seed: int = 7, count: int = 40) -> tuple[list[bytes], list[bytes]]:
    """(spam, ham) synthetic mails."""
    rng = random.Random(seed)
    return [spammy(rng) for _ in range(count)], [hammy(rng) for _ in range(count)]


def small_db(seed: int = 7, count: int = 40) -> Database:
    spam, ham = corpus(seed, count)
    db = Database()
    db.fit([(tokenize(raw), True) for raw in spam] + [(tokenize(raw), False) for raw in ham])
    return db


def write_folder(folder: Path, mails: list[bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, raw in enumerate(mails):
        (folder / f"{i:04d}.eml").write_bytes(raw)
    return folder


def write_mbox(path: Path, mails: list[bytes]) -> Path:
    with open(path, "wb") as f:
        for raw in mails:
            f.write(b"From sender@example.org Mon Jan  1 10:00:00 2024\n")
            body = raw.replace(b"\r\n", b"\n")
            body = b"\n".join(
                b">" + line if line.startswith(b"From ") else line for line in body.split(b"\n")
            )
            f.write(body + b"\n\n")
    return path


def deep_multipart(depth: int, leaf_text: str = "deepest words here") -> bytes:
    """A multipart nested `depth` levels, with text at the top and the bottom."""
    inner = f"Content-Type: text/plain\r\n\r\n{leaf_text}\r\n".encode()
    for level in range(depth, 0, -1):
        b = f"b{level}".encode()
        inner = (
            b'Content-Type: multipart/mixed; boundary="' + b + b'"\r\n\r\n'
            b"--" + b + b"\r\n" + inner + b"\r\n--" + b + b"--\r\n"
        )
    top = (
        b"From: a@example.org\r\nSubject: nested surface\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="top"\r\n\r\n'
        b"--top\r\nContent-Type: text/plain\r\n\r\nshallow visible words\r\n"
        b"--top\r\n" + inner + b"\r\n--top--\r\n"
    )
    return top


def big_attachment(size: int = 20 * 1024 * 1024) -> bytes:
    """A mail with a short text part and a `size`-byte base64 attachment."""
    import base64

    payload = base64.encodebytes(bytes(range(256)) * (size // 256 // 4 * 3 + 1))[:size]
    return (
        b"From: a@example.org\r\nTo: b@example.net\r\nSubject: the big report\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="BIG"\r\n\r\n'
        b"--BIG\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        b"please find attached quarterly numbers\r\n"
        b'--BIG\r\nContent-Type: application/octet-stream; name="data.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="data.bin"\r\n\r\n'
        + payload.replace(b"\n", b"\r\n")
        + b"\r\n--BIG--\r\n"
    )
