"""Where poste's CPU goes: a py-spy raw profile (`bench/inbound.sh` or `bench/outbound.sh`
with PROFILE=1) by area.

Run by hand: `.venv/bin/python bench/profile_areas.py PROFILE.txt [--top 15]`.
Each sample is charged to the area of its innermost frame that belongs to one (so a
log call made by the SMTP server counts as logging, a DNS query made by SPF as DNS);
samples with no such frame are the event loop and the rest.  `--top` also lists the
functions with the most samples of their own (leaf frames), `--inclusive` those on the
stack of the most samples (a function's line numbers merged).
"""

from __future__ import annotations

import argparse
import collections
import re

# (area, pattern on "function (file:line)"), the first that matches a frame wins
AREAS = [
    ("logging", r"\(logging/|poste/runtime/logs\.py"),
    ("DNS", r"\(dns/|poste/dns/|\(DNS/"),
    ("DKIM", r"\(dkim/|poste/dkim/|poste/services/verifier/dkim"),
    ("ARC", r"poste/dkim/arc\.py|services/relay/own_mail\.py"),
    ("SPF", r"\(spf\.py|services/verifier/spf\.py"),
    ("DMARC", r"services/verifier/dmarc|authheaders|publicsuffix"),
    ("verifier other", r"services/verifier/"),
    ("spam", r"poste/spam/|services/spamfilter/"),
    ("submission AUTH/senders", r"services/submission/|argon2|poste/users/passwords"),
    ("signer other", r"services/signer/"),
    ("spool", r"services/relay/spool\.py|services/relay/pools\.py"),
    ("relay stage/router/SRS", r"services/relay/(stage|router|srs|scheduler)\.py|poste/users/"),
    ("relay outgoing SMTP", r"services/relay/delivery\.py|aiosmtplib/|poste/smtp/client\.py"),
    ("SMTP receive (aiosmtpd + core)", r"aiosmtpd/|poste/smtp/"),
    ("TLS/ssl", r"\(ssl\.py"),
    ("thread pool", r"concurrent/futures|threading\.py"),
    ("event loop", r"asyncio/|selectors\.py"),
]
COMPILED = [(name, re.compile(p)) for name, p in AREAS]


def area_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pattern in COMPILED:
            if pattern.search(frame):
                return name
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=0)
    ap.add_argument("--inclusive", type=int, default=0, metavar="N",
                    help="also the N functions on the stack of the most samples (callees"
                         " included): where a cost starts, not only where it ends")
    args = ap.parse_args()
    areas: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(args.profile) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            areas[area_of(frames)] += n
            leaves[frames[-1]] += n
            for frame in set(re.sub(r":\d+\)$", ")", f) for f in frames):
                inclusive[frame] += n
            total += n
    print(f"| area | share of the CPU ({total} samples) |")
    print("|---|---|")
    for name, n in areas.most_common():
        print(f"| {name} | {100 * n / total:.1f}% |")
    if args.top:
        print("\n| function (own samples) | share |\n|---|---|")
        for frame, n in leaves.most_common(args.top):
            print(f"| `{frame}` | {100 * n / total:.1f}% |")
    if args.inclusive:
        print("\n| function (samples with it on the stack) | share |\n|---|---|")
        for frame, n in inclusive.most_common(args.inclusive):
            print(f"| `{frame}` | {100 * n / total:.1f}% |")


if __name__ == "__main__":
    main()
