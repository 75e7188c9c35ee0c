"""The signer's settings: `poste signer` flags and `[signer]` keys."""

from poste.dkim.sign import DEFAULT_HEADERS
from poste.runtime.settings import (
    DESTINATION,
    FILES,
    HOSTNAME,
    LISTEN,
    OPERATIONS,
    STRS,
    Setting,
    find,
)

SETTINGS = (
    Setting("domain", required=True, short="-d", help="The signing domain (d= tag)."),
    Setting("selector", STRS, required=True, short="-s", help="Selector, one per key."),
    Setting("private-key", FILES, required=True, short="-k",
            help="DKIM key (PEM, rsa or ed25519); repeat with --selector for dual signing."),
    DESTINATION,
    LISTEN,
    HOSTNAME,
    Setting("dns-server", metavar="IP[:PORT]", help="Primary DNS server to publish keys to."),
    Setting("dns-key", metavar="NAME:ALG:SECRET", help="TSIG key allowed to update the zone."),
    Setting("zone", help="Zone to update (default: --domain)."),
    Setting("sign-headers", metavar="F1,F2,...",
            help="Header fields to sign (default: " + ",".join(DEFAULT_HEADERS) + ")."),
    Setting("oversign", metavar="F1,...",
            help="Fields signed once more than present, so none can be added (default: From)."),
    *OPERATIONS,
)
SIGN_HEADERS = find(SETTINGS, "sign-headers")  # `poste dkim sign` has them too
OVERSIGN = find(SETTINGS, "oversign")
