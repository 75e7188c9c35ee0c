"""Obtain a certificate from an ACME CA (RFC 8555) by DNS-01, published with RFC 2136 + TSIG
(or by HTTP-01 for a domain whose DNS takes no UPDATE: http01.py).

The protocol (JWS, nonces, orders, polling) is certbot's `acme` library; what
is ours is the glue: the account kept in the state folder, the challenge TXT
records sent to the primary by the same UPDATE path the signer publishes its
DKIM keys with (`poste.dns.update`), and every failure said in one line.  The
library is synchronous (requests), so each of its calls runs in a thread; the
DNS updates are asyncio.  The challenge records are withdrawn whatever the
outcome, and nothing is installed unless the CA issued: the last good
certificate stays in place on any failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from poste.certs.http01 import HTTP01, ResponderError
from poste.certs.store import CertInfo, Store, StoreError, private_pem
from poste.dns.records import Record
from poste.dns.resolver import Nameserver
from poste.dns.update import DNSUpdateError, TsigKey, publish, withdraw, zone_of

log = logging.getLogger("poste.cert")

CHALLENGE_TTL = 60  # the record lives minutes; a short TTL keeps resolvers from holding it
ORDER_TIMEOUT = 120.0  # seconds for the CA to validate and issue


class ACMEError(Exception):
    """The certificate could not be obtained; the message is the one line to show."""


@dataclass(frozen=True)
class CA:
    """An ACME server: its directory URL, our contact, and (tests, private CAs) the CA file
    its HTTPS certificate is checked against."""

    directory: str
    email: str | None = None
    ca_file: str | None = None


@dataclass(frozen=True)
class Primary:
    """Where the `_acme-challenge` TXT records go: the zone's primary, its TSIG key, and the
    zone (None: the one the primary answers a SOA query with)."""

    server: Nameserver
    key: TsigKey
    zone: str | None = None


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


def _reason(exc: BaseException) -> str:
    """The useful end of a requests/urllib3 error chain (they nest five deep)."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        m = re.search(r"certificate verify failed: ([^(')]+)", text)
        return "its HTTPS certificate does not verify" + (f" ({m.group(1).strip()})" if m else "")
    m = _ERRNO.search(text)
    if m:
        return m.group(1).strip()
    if "timed out" in text.lower():
        return "timed out"
    return type(exc).__name__


def _client(store: Store, ca: CA) -> tuple[Any, Any]:
    """A ClientV2 with our account (registered on first use), and the account JWK."""
    import requests
    from acme import client, errors, messages
    from josepy.jwk import JWKRSA

    key = JWKRSA(key=store.account_key())
    net = client.ClientNetwork(key, user_agent="poste", verify_ssl=ca.ca_file or True)  # type: ignore[arg-type]
    try:
        directory = client.ClientV2.get_directory(ca.directory, net)
    except (requests.RequestException, OSError) as exc:
        raise ACMEError(f"ACME server {ca.directory} unreachable: {_reason(exc)}") from None
    except (ValueError, errors.Error) as exc:
        raise ACMEError(f"{ca.directory} is not an ACME directory: {exc}") from None
    acme = client.ClientV2(directory, net)
    uri = store.account(ca.directory)
    if uri:
        net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
        return acme, key
    reg = messages.NewRegistration.from_data(email=ca.email, terms_of_service_agreed=True)
    try:
        regr = acme.new_account(reg)
        uri = regr.uri
    except errors.ConflictError as exc:  # the key has an account already
        uri = exc.location
        net.account = messages.RegistrationResource(uri=uri, body=messages.Registration())
    store.save_account(ca.directory, uri)
    log.info("cert: ACME account %s", uri)
    return acme, key


def _failures(exc: Any) -> str:
    """Why the CA refused the challenges of a ValidationError, name by name."""
    out = []
    for authzr in exc.failed_authzrs:
        name = authzr.body.identifier.value
        errs = [str(c.error.detail or c.error.typ) for c in authzr.body.challenges if c.error]
        out.append(f"{name}: {'; '.join(errs) or 'invalid'}")
    return ", ".join(out)


async def obtain(
    store: Store, ca: CA, primary: Primary | HTTP01, names: Sequence[str], *,
    replacing: CertInfo | None = None,
) -> CertInfo:
    """A new certificate and key for `names`, installed in `store`; ACMEError otherwise.

    One order at a time per state folder (the store's lock), so a stack and
    `poste cert renew` beside it cannot race each other.  With `replacing`, a
    certificate for `names` that another process installed while we waited
    for the lock is taken instead of ordering a second one.
    """
    fd = await asyncio.to_thread(store.lock)
    try:
        if replacing is not None:
            now = store.info()
            if now is not None and now.serial != replacing.serial and now.covers(names):
                log.info("cert: %s was renewed meanwhile", store.cert_path)
                return now
        return await _obtain(store, ca, primary, list(names))
    except StoreError as exc:
        raise ACMEError(str(exc)) from None
    finally:
        store.unlock(fd)


async def _obtain(store: Store, ca: CA, primary: Primary | HTTP01, names: list[str]
                  ) -> CertInfo:
    """DNS-01 through `primary`, or HTTP-01 answered by the responder while the CA checks."""
    import requests
    from acme import crypto_util, errors, messages
    from acme.challenges import DNS01
    from acme.challenges import HTTP01 as HTTP01Challenge

    cert_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_pem = private_pem(cert_key)
    csr = crypto_util.make_csr(key_pem, names)
    published: dict[str, list[Record]] = defaultdict(list)
    try:
        acme, jwk = await asyncio.to_thread(_client, store, ca)
        try:
            order = await asyncio.to_thread(acme.new_order, csr)
        except messages.Error as exc:
            if exc.code != "accountDoesNotExist":
                raise
            log.warning("cert: %s forgot our account: registering again", ca.directory)
            store.forget_account(ca.directory)
            acme, jwk = await asyncio.to_thread(_client, store, ca)
            order = await asyncio.to_thread(acme.new_order, csr)
        answers = []
        for authzr in order.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue  # the CA remembers an earlier validation
            name = authzr.body.identifier.value
            kind = HTTP01Challenge if isinstance(primary, HTTP01) else DNS01
            challb = next((c for c in authzr.body.challenges if isinstance(c.chall, kind)),
                          None)
            if challb is None:
                raise ACMEError(f"{ca.directory} offers no {kind.typ.upper()} challenge"
                                f" for {name}")
            if isinstance(primary, HTTP01):
                response, validation = challb.response_and_validation(jwk)
                primary.tokens[challb.chall.encode("token")] = validation
                answers.append((challb, response))
                continue
            record = Record(challb.chall.validation_domain_name(name) + ".", "TXT",
                            (challb.chall.validation(jwk),), CHALLENGE_TTL)
            zone = primary.zone or await zone_of(record.name, primary.server)
            await publish([record], zone, primary.server, primary.key)
            published[zone].append(record)
            answers.append((challb, challb.chall.response(jwk)))
        responder = primary.serving() if isinstance(primary, HTTP01) else contextlib.nullcontext()
        async with responder:
            for challb, response in answers:
                await asyncio.to_thread(acme.answer_challenge, challb, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
            done = await asyncio.to_thread(acme.poll_and_finalize, order, deadline)
    except DNSUpdateError as exc:
        raise ACMEError(f"cannot publish the DNS-01 challenge: {exc}") from None
    except ResponderError as exc:
        raise ACMEError(str(exc)) from None
    except errors.ValidationError as exc:
        which = "HTTP-01" if isinstance(primary, HTTP01) else "DNS-01"
        raise ACMEError(f"the CA refused the {which} challenge: {_failures(exc)}") from None
    except errors.TimeoutError:
        raise ACMEError(f"the CA did not issue within {ORDER_TIMEOUT:.0f} s") from None
    except messages.Error as exc:
        raise ACMEError(f"the ACME server refused: {exc.detail or exc.typ}") from None
    except (requests.RequestException, OSError) as exc:
        raise ACMEError(f"ACME server {ca.directory} unreachable: {_reason(exc)}") from None
    except errors.Error as exc:
        raise ACMEError(f"ACME: {exc}") from None
    finally:
        if isinstance(primary, HTTP01):
            primary.tokens.clear()
        for zone, records in published.items():
            assert isinstance(primary, Primary)
            try:
                await withdraw(records, zone, primary.server, primary.key)
            except DNSUpdateError as exc:
                log.warning("cert: could not withdraw the challenge records: %s", exc)
    info = store.install(done.fullchain_pem.encode(), key_pem)
    log.info("cert: obtained a certificate for %s, valid until %s (%s)", ", ".join(info.names),
             info.not_after.isoformat(timespec="seconds"), info.issuer)
    return info
