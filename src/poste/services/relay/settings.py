"""The relay's settings: `poste relay` flags and `[relay]` keys (and the scheduler's defaults)."""

from poste.runtime.settings import (
    DIR,
    DURATION,
    FILE,
    FILES,
    FLAG,
    HOSTNAME,
    INT,
    LISTEN,
    NAMESERVER,
    OPERATIONS,
    PATH,
    STR,
    STRS,
    Setting,
    find,
)

SETTINGS = (
    Setting("domain", STRS, required=True, metavar="D",
            help="Our mail domain (repeat for more; the first is the users' default)."),
    Setting("postmaster", required=True, metavar="ADDR", help="Where mail to postmaster@ goes."),
    Setting("users", PATH, required=True, help="The Git users repository."),
    Setting("spool", DIR, required=True, help="Queue folder (created if missing)."),
    LISTEN.but(stack_default=None),  # in `poste up`, the relay's own listener is optional
    NAMESERVER.but(help="DNS resolver for MX lookups (default: resolv.conf)."),
    Setting("smtp-port", INT, default=25, min=1, max=65535, show_default=True,
            help="Port of remote MX hosts (change only for tests)."),
    Setting("local-socket", PATH,
            help="A unix socket for our own signer or submission: mail that comes in on "
                 "it may go to any domain (mode 0660: keep its folder closed to others)."),
    Setting("granted", STRS, metavar="CIDR",
            help="Networks also allowed to relay to non-local recipients (a signer on "
                 "another host) [default: none; an address on this machine proves nothing]."),
    Setting("srs-secret", STR, metavar="TEXT", help="SRS secret (prefer --srs-secret-file)."),
    Setting("srs-secret-file", FILE,
            help="SRS secrets, one a line: the first signs, all verify. "
                 "Default: SPOOL/srs-secret, generated once."),
    HOSTNAME,
    Setting("dkim-selector", STRS, metavar="S",
            help="Selector of each --dkim-key (`poste up`: the [signer]'s)."),
    Setting("dkim-key", FILES,
            help="The domain's DKIM key (PEM), repeat with --dkim-selector: DSNs are signed "
                 "with each, forwarded mail ARC-sealed with the RSA one (`poste up`: the "
                 "[signer]'s)."),
    Setting("arc-authserv-id", STR, metavar="NAME",
            help="Our verifier's name in Authentication-Results, whose results a seal "
                 "carries and learn mails are judged by (default: --hostname; `poste up`: "
                 "the [verifier]'s)."),
    Setting("no-from-rewrite", FLAG, default=False,
            help="Never rewrite the From of a forwarded mail (by default, a mail whose "
                 "author's domain asks for DMARC reject or quarantine and whose DKIM did "
                 "not survive is sent From fwd+TOKEN@ our domain, signed with --dkim-key)."),
    Setting("learn-db", FILE,
            help="The spamfilter's --db: mail forwarded by a user from a target address to "
                 "learn-spam@ or learn-ham@ a domain of ours trains it (trusted when SPF or "
                 "DKIM passes aligned, in --arc-authserv-id's results; `poste up`: the "
                 "[spamfilter]'s db) [default: no learning]."),
    Setting("retry-min", DURATION, default="5m", show_default=True,
            help="First retry delay; doubles each attempt."),
    Setting("retry-max", DURATION, default="4h", show_default=True, help="Longest retry delay."),
    Setting("lifetime", DURATION, default="5d", show_default=True,
            help="Give up (failure DSN) after this long in the queue."),
    Setting("warn-after", DURATION, default="4h", show_default=True,
            help="Send a delay DSN after this long (0: never)."),
    Setting("domain-concurrency", INT, default=10, min=1, max=1000, show_default=True,
            help="SMTP sessions at once per destination domain."),
    Setting("queue-rescan", DURATION, default="30s", show_default=True,
            help="How often to re-read the spool (for `poste queue retry|delete`)."),
    Setting("users-poll", DURATION, default="2s", show_default=True,
            help="How often to check the users repository for a new commit."),
    Setting("max-received", INT, default=30, min=1, max=1000, show_default=True,
            help="More Received: fields than this is a loop (554)."),
    Setting("spam-label", default="X-Spamtacus", show_default=True, metavar="NAME",
            help="The spamfilter's label field (its --header-name; `poste up`: the "
                 "[spamfilter]'s): a user's spam policy acts on mail it labelled `yes`."),
    Setting("quarantine-digest", default="06:00", show_default=True, metavar="HH:MM|DURATION",
            help="When each `quarantine` user gets the digest of held spam: a time of day "
                 "(UTC) or an interval (e.g. 12h)."),
    Setting("quarantine-days", INT, default=30, min=1, max=3650, show_default=True,
            help="Held spam is deleted (journalled and logged) after this many days."),
    Setting("no-ipv6", FLAG, default=False, help="Deliver over IPv4 only."),
    Setting("tls-ca-file", FILE,
            help="CA bundle that certificates of MX hosts under an MTA-STS policy, MTA-STS "
                 "policy servers and TLS-RPT endpoints are verified against "
                 "(default: the system's)."),
    Setting("no-mta-sts", FLAG, default=False,
            help="Ignore destinations' MTA-STS policies (RFC 8461)."),
    Setting("no-dane", FLAG, default=False,
            help="Ignore TLSA records (DANE, RFC 7672; needs a validating resolver, "
                 "e.g. a local unbound, as --nameserver: only answers with the AD bit count)."),
    Setting("mta-sts-port", INT, default=443, min=1, max=65535, show_default=True,
            help="HTTPS port of destinations' MTA-STS policy servers (change only for tests)."),
    Setting("self-address", STRS, metavar="IP",
            help="Another address of ours (e.g. the public IP of our MX): mail whose MX "
                 "resolves to it, or to --listen, loops back and is bounced (5.4.6)."),
    Setting("mailbox", PATH, cli=False,
            help="Deliver everything into this folder instead of MX hosts (the demo)."),
    *OPERATIONS,
)


def default(key: str) -> float:
    """A default as the scheduler's `Policy` takes it (seconds, counts)."""
    return float(find(SETTINGS, key).initial())
