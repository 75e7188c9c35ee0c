"""The signer's settings: `poste signer` flags and `[signer]` keys."""

from poste.dkim.sign import DEFAULT_HEADERS
from poste.runtime.settings import (
    DESTINATION,
    DURATION,
    FILES,
    HOSTNAME,
    LISTEN,
    OPERATIONS,
    PATH,
    STRS,
    Setting,
    find,
)

SETTINGS = (
    Setting("domain", required=True, short="-d", help="The signing domain (d= tag)."),
    Setting("selector", STRS, short="-s", help="Selector, one per key."),
    Setting("private-key", FILES, short="-k",
            help="DKIM key (PEM, rsa or ed25519); repeat with --selector for dual signing."),
    Setting("key-dir", PATH, metavar="DIR",
            help="Rotated keys (`poste dkim rotate`): sign with the active key of each series."),
    Setting("rotate-every", DURATION, metavar="DURATION",
            help="With key-dir and dns-server: start a rotation when the active key is this"
                 " old (e.g. 90d; default: only `poste dkim rotate`)."),
    Setting("rotation-grace", DURATION, default="7d", show_default=True,
            help="How long a retired key's record stays published after the switch."),
    Setting("rotation-check", DURATION, default="1m", show_default=True,
            help="How often the key folder is looked at (switch, withdraw, schedule)."),
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
