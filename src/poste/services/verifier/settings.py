"""The verifier's settings: `poste verifier` flags and `[verifier]` keys."""

from poste.runtime.settings import (
    ACME,
    CHOICE,
    DESTINATION,
    DURATION,
    FLAG,
    FLOAT,
    HOSTNAME,
    LISTEN,
    NAMESERVER,
    OPERATIONS,
    PATH,
    STRS,
    TLS_CERT,
    TLS_KEY,
    Setting,
)

SETTINGS = (
    Setting("domain", STRS, required=True, metavar="DOMAIN",
            help="A domain we receive mail for (repeatable)."),
    DESTINATION,
    Setting("postmaster", metavar="ADDR", help="Our postmaster's address (always accepted)."),
    LISTEN.but(stack_default="0.0.0.0:25"),
    TLS_CERT,
    TLS_KEY,
    *ACME,
    NAMESERVER.but(help="DNS server for SPF/DKIM/DMARC lookups (repeatable; default: the system's)."),
    Setting("dns-timeout", FLOAT, default=5.0, show_default=True, help="Seconds per DNS query."),
    Setting("psl", PATH, metavar="FILE",
            help="A public_suffix_list.dat fresher than the packaged one"
                 " (DMARC organisational domains)."),
    HOSTNAME,
    Setting("require-tls", FLAG, default=False, help="Refuse mail before STARTTLS (530)."),
    Setting("mta-sts", CHOICE, default="off", choices=("off", "testing", "enforce"),
            show_default=True,
            help="Serve our MTA-STS policy (RFC 8461) at https://mta-sts.DOMAIN/.well-known/"
                 "mta-sts.txt with this listener's certificate (ACME: mta-sts.DOMAIN is added to "
                 "its names); publish what `poste dns records --mta-sts MODE` prints."),
    Setting("mta-sts-listen", metavar="ADDR:PORT", default="0.0.0.0:443", show_default=True,
            help="Where the MTA-STS policy server listens (port 443 of mta-sts.DOMAIN)."),
    Setting("mta-sts-max-age", DURATION, default="7d", show_default=True,
            help="How long senders keep our MTA-STS policy (max_age)."),
    Setting("mta-sts-mx", STRS, metavar="NAME",
            help="An MX name for the policy's mx: lines (repeatable; default: hostname)."),
    Setting("reject-failures", FLAG, default=False,
            help="Refuse SPF fail and DMARC p=reject failures with 550 (default: label only)."),
    *OPERATIONS,
)
