"""The tokenizer sees what a reader sees, tags where it saw it, and never fails."""

from __future__ import annotations

import base64
import quopri
import random

import pytest

from poste.spam.mime import MAX_DEPTH
from poste.spam.tokenizer import tokenize
from support.spamkit import big_attachment, deep_multipart, mail


def test_plain_words_are_lowercased_and_subject_words_carry_their_origin() -> None:
    toks = tokenize(mail("Quarterly Budget", "The Budget meeting is on Tuesday.\n"))
    assert {"budget", "meeting", "tuesday", "subject:quarterly", "subject:budget"} <= toks
    assert "Budget" not in toks
    assert "from:domain:example.org" in toks
    assert "ct:text/plain" in toks


def test_base64_utf8_body_is_decoded() -> None:
    body = base64.encodebytes("Grüße aus München, Überweisung bestätigt\n".encode()).decode()
    raw = mail(
        "x",
        body,
        extra="Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64",
    )
    toks = tokenize(raw)
    assert {"grüße", "münchen", "überweisung", "bestätigt"} <= toks
    assert "cte:base64" in toks


def test_quoted_printable_latin1_with_soft_breaks() -> None:
    text = "Le café est très bon, réservation confirmée pour demain " * 3
    body = quopri.encodestring(text.encode("latin-1")).decode("ascii")
    assert "=\n" in body  # soft line breaks are exercised
    raw = mail(
        "x",
        body,
        extra="Content-Type: text/plain; charset=iso-8859-1\n"
        "Content-Transfer-Encoding: quoted-printable",
    )
    toks = tokenize(raw)
    assert {"café", "très", "réservation", "confirmée"} <= toks
    assert "charset:iso-8859-1" in toks


def test_rfc2047_subject_and_from_name_are_decoded() -> None:
    raw = mail(
        "=?utf-8?B?R3LDvMOfZSBhdXM=?= =?iso-8859-1?Q?M=FCnchen_heute?=",
        "body\n",
        sender="=?utf-8?q?J=C3=B6rg_Schmidt?= <jorg@example.de>",
    )
    toks = tokenize(raw)
    # white space between adjacent encoded words is not text (RFC 2047 6.2)
    assert {"subject:grüße", "subject:ausmünchen", "subject:heute"} <= toks
    assert {"from:name:jörg", "from:name:schmidt", "from:addr:jorg@example.de"} <= toks


def test_html_is_reduced_to_text_and_link_hosts() -> None:
    html = (
        "<html><head><style>.hidden { color: white }</style></head><body>"
        "<script>var trackingcode = 1;</script>"
        "<p>Visit our <b>amazing</b>&nbsp;store &amp; save</p>"
        '<a href="http://www.shop.example.com/x?y=1">here</a>'
        '<img src="//cdn.pics.example.net/a.gif">'
        "<!-- hiddencomment --></body></html>"
    )
    raw = mail("x", html, extra="Content-Type: text/html; charset=utf-8")
    toks = tokenize(raw)
    assert {"visit", "amazing", "store", "save"} <= toks
    assert {"url:www.shop.example.com", "url:example.com", "url:cdn.pics.example.net"} <= toks
    assert "html:a" in toks and "html:img" in toks
    assert not {"hidden", "trackingcode", "hiddencomment", "color"} & toks
    assert not any("<" in t or "&nbsp" in t for t in toks)


def test_urls_in_plain_text_give_host_tokens() -> None:
    toks = tokenize(mail("x", "see https://login.bank.example.co.uk/verify now\n"))
    assert {"url:login.bank.example.co.uk", "url:example.co.uk"} <= toks
    toks = tokenize(mail("x", "go to http://192.168.10.20/x\n"))
    assert {"url:ip", "url:192.168.10"} <= toks


def test_multipart_alternative_reads_both_parts_and_skips_attachments() -> None:
    attachment = base64.encodebytes(b"secretbinaryword " * 50).decode()
    raw = mail(
        "x",
        "--XX\nContent-Type: text/plain\n\nplainpart words\n"
        "--XX\nContent-Type: text/html\n\n<p>htmlpart words</p>\n"
        "--XX\nContent-Type: application/pdf; name=report.pdf\n"
        "Content-Transfer-Encoding: base64\n\n" + attachment + "--XX--\n",
        extra='Content-Type: multipart/alternative; boundary="XX"',
    )
    toks = tokenize(raw)
    assert {"plainpart", "htmlpart", "ct:multipart/alternative", "ct:application/pdf"} <= toks
    assert "filename:pdf" in toks
    assert "secretbinaryword" not in toks


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n\r\n",
        b"no header at all, just words here",
        b"Subject: only a header",
        b"Content-Type: multipart/mixed\r\n\r\nno boundary parameter words",
        b'Content-Type: multipart/mixed; boundary="Q"\r\n\r\n--Q\r\nunclosed part words',
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not*base64@@",
        b"Content-Type: text/plain; charset=no-such-charset\r\n\r\ncharset words",
        b'Content-Type: text/plain; charset="utf-8\r\n\r\nbroken quote words',
        b"Content-Type: ;;;===\r\nContent-Transfer-Encoding: x-weird\r\n\r\nodd words",
        b"Subject: =?utf-8?B?####?= =?bogus?Q?=ZZ?=\r\n\r\nencoded word junk",
        b"Subject: \xff\xfe\x80 junk \xc3\r\nFrom: \x90\x91 <@@>\r\nX-\xff: \xff\r\n\r\nbody",
        b"From: <\r\nTo: ,,,@\r\nReceived: from [999.1.2.3] by\r\n\r\nbody",
        bytes(range(256)) * 40,
        b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner words",
    ],
)
def test_malformed_mail_never_raises_and_still_gives_tokens(raw: bytes) -> None:
    toks = tokenize(raw)
    assert isinstance(toks, set)
    for t in toks:
        assert t and not any(c.isspace() for c in t), repr(t)


def test_broken_mime_keeps_the_words() -> None:
    toks = tokenize(b"Content-Type: multipart/mixed\r\n\r\nno boundary parameter words")
    assert {"boundary", "parameter", "mime:no-boundary"} <= toks
    toks = tokenize(b'Content-Type: multipart/mixed; boundary="Q"\r\n\r\n--Q\r\nunclosed words')
    assert "unclosed" in toks


def test_eight_bit_junk_headers_are_tokenized_and_flagged() -> None:
    raw = b"Subject: Gr\xfc\xdfe caf\xe9 \xff\r\nFrom: M\xfcller <m@example.de>\r\n\r\nbody text"
    toks = tokenize(raw)
    assert "header:8bit" in toks
    assert "subject:café" in toks  # undeclared 8-bit read as cp1252
    assert "from:addr:m@example.de" in toks


def test_random_bytes_never_raise() -> None:
    rng = random.Random(1)
    for _ in range(200):
        raw = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 600)))
        tokenize(b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n" + raw)
        tokenize(raw)


def test_two_hundred_deep_multipart_completes_and_is_flagged() -> None:
    toks = tokenize(deep_multipart(200))
    assert {"shallow", "visible", "subject:nested"} <= toks
    assert "mime:too-deep" in toks or "mime:too-many-parts" in toks
    # a nesting within the limit is read to the bottom
    shallow = tokenize(deep_multipart(MAX_DEPTH - 2))
    assert "deepest" in shallow


def test_twenty_megabyte_attachment_is_not_decoded() -> None:
    raw = big_attachment()
    assert len(raw) > 20 * 1024 * 1024
    toks = tokenize(raw)
    assert {"quarterly", "numbers", "ct:application/octet-stream", "filename:bin"} <= toks
    assert len(toks) < 100


def test_twenty_megabyte_text_body_is_capped() -> None:
    words = " ".join(f"w{i}" for i in range(200_000))
    raw = mail("huge", (words + "\n") * 15)
    assert len(raw) > 20 * 1024 * 1024
    toks = tokenize(raw)
    assert "w100" in toks
    # only the first DEFAULT_MAX_BYTES of text were read
    assert len(toks) < 60_000


def test_mbox_from_line_is_ignored() -> None:
    raw = b"From someone@example.org Mon Jan  1 00:00:00 2024\n" + mail("hello", "words\n")
    toks = tokenize(raw)
    assert "subject:hello" in toks


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "raw",
    [
        b"From: " + b"a" * 60_000 + b"\r\n\r\nbody",
        b"From: " + b"<" * 60_000 + b"\r\n\r\nbody",
        b"Content-Type: text/html\r\n\r\n" + b"<style>" * 50_000,
        b"Content-Type: text/html\r\n\r\n" + b"<!--" * 50_000,
        b"Content-Type: text/html\r\n\r\n" + b"<a " * 70_000,
        b"Content-Type: text/plain; " + b'a="b; ' * 10_000 + b"\r\n\r\nbody",
        b"Subject: " + b"=?utf-8?q?" * 6_000 + b"\r\n\r\nx",
        b"\r\n\r\nhttp://" + b"a." * 100_000,
    ],
    ids=[
        "long-from",
        "from-brackets",
        "unclosed-style",
        "unclosed-comments",
        "open-tags",
        "quoted-params",
        "encoded-word-junk",
        "long-host",
    ],
)
def test_hostile_inputs_take_linear_time(raw: bytes) -> None:
    """Inputs that make naive regexes quadratic (seconds to minutes) finish at once."""
    tokenize(raw)


def test_hidden_html_is_dropped_even_when_unclosed() -> None:
    toks = tokenize(
        mail(
            "x",
            "<p>seen</p><style>p{}</style>after<!-- never closed hidden",
            extra="Content-Type: text/html",
        )
    )
    assert {"seen", "after"} <= toks
    assert "hidden" not in toks and "never" not in toks
