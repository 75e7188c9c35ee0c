#!/usr/bin/env python3
"""Accuracy and speed of poste's spam classifier against spamoracle and bogofilter.

    .venv/bin/python bench/spam_accuracy.py [CORPUS.tar.gz] [--test-fraction 0.25] [--runs 3]

The corpus is a .tar.gz with one folder per class, spam folders named
`spam*`, everything else ham (the SpamAssassin public corpus layout:
easy_ham/, hard_ham/, spam/).  Two splits, each folder split on its own
with the functions `poste spam eval --split` uses:

- random: files sorted by name, every n-th (--test-fraction 0.25: every
  4th) is a test mail;
- time: the newest --test-fraction of the folder by arrival (the date of
  the first Received: field, else Date:) are test mails, the older ones
  train: the filter meets spam it has never seen, as in use.

For each split, all three tools train from scratch on the same two
training mboxes and classify the same test mbox, with their default
settings:

    poste       poste spam train --spam S --ham H -o DB ; poste spam mark --db DB TEST
    spamoracle  spamoracle -f DB add -spam S -good H    ; spamoracle -f DB mark TEST
    bogofilter  bogofilter -C -d DIR -M -s|-n -I S|H    ; bogofilter -C -d DIR -M -t -I TEST

Speed is measured on the time split's test mbox and on an mbox of
--speed-copies copies of it: messages per wall-clock second of the whole
classifying command (process start and database load included), every
one of --runs runs shown (the runs of the tools interleaved, so a busy
machine penalises them alike, after one untimed run of each command), for `poste spam classify -j1` (one core),
`poste spam mark -j1`, `poste spam mark` (one worker per core),
`spamoracle mark` and `bogofilter -t`.  CPU seconds (user+sys, the
least of the runs) are for the big mbox.

The commands run without PYTHONDONTWRITEBYTECODE (which some shells and
CI images set), so that the untimed training run writes poste's bytecode
and the timed runs start from it, as an installed package does; an
editable install that never had its bytecode written recompiles its
modules on every start (tens of milliseconds).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from poste.spam.corpus import mail_time
from poste.spam.evaluate import interleaved_split, time_split

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus" / "spamassassin-dev.tar.gz"
POSTE = str(Path(sys.executable).parent / "poste")
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def mbox_bytes(raw: bytes) -> bytes:
    """One mail as an mboxrd entry."""
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1] if b"\n" in raw else b""
    raw = re.sub(rb"^(>*From )", rb">\1", raw, flags=re.M)
    if not raw.endswith(b"\n"):
        raw += b"\n"
    return b"From bench@localhost Thu Jan  1 00:00:00 2004\n" + raw + b"\n"


def load_folders(corpus: Path) -> dict[str, list[bytes]]:
    """The mails of each top folder of the archive, sorted by name."""
    folders: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(corpus, "r:*") as tar:
        for m in tar.getmembers():
            if not m.isfile() or "/" not in m.name:
                continue
            folder, name = m.name.split("/", 1)
            if name.startswith(".") or name.startswith("cmds"):
                continue
            f = tar.extractfile(m)
            assert f is not None
            folders.setdefault(folder, []).append((name, f.read()))
    return {k: [raw for _, raw in sorted(v)] for k, v in sorted(folders.items())}


def split(
    folders: dict[str, list[bytes]], how: str, fraction: float
) -> tuple[dict[str, list[bytes]], list[tuple[str, bytes]]]:
    """(training spam and ham, test mails with their folder) of one split.

    The same split functions as `poste spam eval --split`: each folder on
    its own, random = every n-th by name, time = the newest by arrival.
    """
    train: dict[str, list[bytes]] = {"spam": [], "ham": []}
    test: list[tuple[str, bytes]] = []
    for folder, raws in folders.items():
        cls = "spam" if folder.startswith("spam") else "ham"
        if how == "time":
            mask = time_split([mail_time(r) for r in raws], fraction)
        else:
            mask = interleaved_split(len(raws), fraction)
        for raw, is_test in zip(raws, mask, strict=True):
            if is_test:
                test.append((folder, raw))
            else:
                train[cls].append(raw)
    return train, test


def run(cmd: list[str], stdin: bytes | None = None, out: Path | None = None) -> tuple[float, float]:
    """Run cmd; (wall seconds, CPU seconds); stdout to `out` if given."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(out or os.devnull, "wb") as f:
        proc = subprocess.run(cmd, input=stdin, stdout=f, stderr=subprocess.PIPE, env=ENV)
    # bogofilter exits 0 spam, 1 ham, 2 unsure (of the last mail), 3 error
    ok = (0, 1, 2) if cmd[0] == "bogofilter" else (0,)
    if proc.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.decode(errors='replace')}")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def field_labels(marked: Path, pattern: bytes) -> list[str]:
    """The label each message of a marked mbox got, from its header block."""
    data = marked.read_bytes()
    starts = [m.start() for m in re.finditer(rb"^From ", data, re.M)]
    labels = []
    rx = re.compile(pattern, re.M | re.I)
    for i, s in enumerate(starts):
        e = starts[i + 1] if i + 1 < len(starts) else len(data)
        msg = data[s:e]
        head_end = msg.find(b"\n\n")
        head = msg[: head_end if head_end >= 0 else len(msg)]
        m = rx.search(head)
        labels.append(m.group(1).decode().lower() if m else "missing")
    return labels


def bogo_labels(out: Path) -> list[str]:
    word = {"S": "yes", "H": "no", "U": "unknown"}
    return [word.get(line.split()[0], "missing") for line in out.read_text().splitlines() if line]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", nargs="?", default=str(DEFAULT_CORPUS))
    ap.add_argument(
        "--test-fraction", type=float, default=0.25, help="part of each folder that is test mail"
    )
    ap.add_argument("--runs", type=int, default=3, help="timed runs per tool (all are shown)")
    ap.add_argument(
        "--speed-copies",
        type=int,
        default=10,
        help="copies of the time split's test mbox in the big mbox timed for speed",
    )
    ap.add_argument("--keep", help="keep the work folder here")
    ap.add_argument(
        "--accuracy-only",
        action="store_true",
        help="no timing; exit status from the accuracy conditions alone (CI's corpus check: "
        "the speed ones depend on how busy the machine is): poste catches more spam than "
        "both references on both splits, and has no more false positives than the best on "
        "the random split",
    )
    ap.add_argument(
        "--speed-only",
        action="store_true",
        help="only the speed part, on the time split of an earlier run kept with --keep DIR "
        "(no corpus read, nothing trained): for trying a change quickly; the figures to "
        "report come from a full run",
    )
    args = ap.parse_args()
    if args.speed_only:
        if not args.keep or not (Path(args.keep) / "time" / "poste.db").is_file():
            print("--speed-only needs --keep DIR of an earlier full run", file=sys.stderr)
            return 2
        sub = Path(args.keep) / "time"
        return 0 if speed(sub / "test.mbox", commands(sub), args.runs, args.speed_copies) else 1
    for tool in ("spamoracle", "bogofilter"):
        if shutil.which(tool) is None:
            print(
                f"{tool} is not installed (apt-get install -y spamoracle bogofilter)",
                file=sys.stderr,
            )
            return 2
    work = Path(args.keep or tempfile.mkdtemp(prefix="spambench."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return bench(
            Path(args.corpus),
            work,
            args.test_fraction,
            args.runs,
            args.speed_copies,
            args.accuracy_only,
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


LABEL_FIELD = {
    "poste": rb"^X-Spamtacus: *(yes|no|unknown)",
    "spamoracle": rb"^X-Spam: *(yes|no|unknown); *[0-9.]+",
}


Commands = Callable[[Path], dict[str, list[str]]]


def train_all(work: Path, train: dict[str, list[bytes]]) -> Commands:
    """Train the three tools from scratch on the same two mboxes in `work`.

    Returns what gives each tool's classifying command for an mbox.
    """
    tr_spam, tr_ham = work / "train-spam.mbox", work / "train-ham.mbox"
    tr_spam.write_bytes(b"".join(map(mbox_bytes, train["spam"])))
    tr_ham.write_bytes(b"".join(map(mbox_bytes, train["ham"])))
    pdb, sdb, bdir = work / "poste.db", work / "spamoracle.db", work / "bogofilter"
    pdb.unlink(missing_ok=True)
    sdb.unlink(missing_ok=True)
    shutil.rmtree(bdir, ignore_errors=True)
    bdir.mkdir()
    for cmd in (
        [POSTE, "spam", "train", "--spam", str(tr_spam), "--ham", str(tr_ham), "-o", str(pdb)],
        ["spamoracle", "-f", str(sdb), "add", "-spam", str(tr_spam), "-good", str(tr_ham)],
        ["bogofilter", "-C", "-d", str(bdir), "-M", "-s", "-I", str(tr_spam)],
        ["bogofilter", "-C", "-d", str(bdir), "-M", "-n", "-I", str(tr_ham)],
    ):
        run(cmd)

    return commands(work)


def commands(work: Path) -> Commands:
    """What gives each tool's classifying command for an mbox, with the databases in `work`."""
    pdb, sdb, bdir = work / "poste.db", work / "spamoracle.db", work / "bogofilter"

    def cmds(mbox: Path) -> dict[str, list[str]]:
        return {
            "poste": [POSTE, "spam", "mark", "--db", str(pdb), str(mbox)],
            "spamoracle": ["spamoracle", "-f", str(sdb), "mark", str(mbox)],
            "bogofilter": ["bogofilter", "-C", "-d", str(bdir), "-M", "-t", "-I", str(mbox)],
        }

    return cmds


def labels_of(tool: str, out: Path) -> list[str]:
    if tool == "bogofilter":
        return bogo_labels(out)
    return field_labels(out, LABEL_FIELD[tool])


def bench(
    corpus: Path, work: Path, fraction: float, runs: int, copies: int, accuracy_only: bool = False
) -> int:
    folders = load_folders(corpus)
    print(
        f"corpus {corpus.name}: {', '.join(f'{k} {len(v)}' for k, v in folders.items())}; "
        f"test part: {fraction:.0%} of each folder, random = every n-th by name, "
        "time = the newest by arrival (first Received: date, else Date:)"
    )
    tools = ("poste", "spamoracle", "bogofilter")
    results: dict[str, dict[str, tuple[int, int, int]]] = {}
    per_folder: dict[str, dict[str, Counter[tuple[str, str]]]] = {}
    sizes: dict[str, tuple[int, int, int, int]] = {}
    time_cmds: Commands | None = None
    time_test = work / "test.mbox"
    for how in ("random", "time"):
        sub = work / how
        sub.mkdir(exist_ok=True)
        train, test = split(folders, how, fraction)
        te = sub / "test.mbox"
        te.write_bytes(b"".join(mbox_bytes(raw) for _, raw in test))
        make = train_all(sub, train)
        cmds = make(te)
        truth = [folder for folder, _ in test]
        nspam = sum(1 for t in truth if t.startswith("spam"))
        sizes[how] = (len(train["spam"]), len(train["ham"]), nspam, len(test) - nspam)
        results[how] = {}
        per_folder[how] = {}
        for tool in tools:
            out = sub / f"out-{tool}"
            run(cmds[tool], out=out)
            labs = labels_of(tool, out)
            if len(labs) != len(test):
                print(f"{tool}: got {len(labs)} labels for {len(test)} mails", file=sys.stderr)
                return 1
            pairs = list(zip(truth, labs, strict=True))
            caught = sum(1 for t, lab in pairs if t.startswith("spam") and lab == "yes")
            fp = sum(1 for t, lab in pairs if not t.startswith("spam") and lab == "yes")
            unk = sum(1 for _, lab in pairs if lab == "unknown")
            results[how][tool] = (caught, fp, unk)
            per_folder[how][tool] = Counter(pairs)
        if how == "time":
            time_cmds, time_test = make, te

    print()
    print(f"{'':<12}" + "".join(f"{h + ' split':^40}" for h in results))
    print(f"{'tool':<12}" + f"{'spam caught':>16}{'ham as spam':>13}{'unknown':>11}" * len(results))
    for tool in tools:
        line = f"{tool:<12}"
        for how, res in results.items():
            caught, fp, unk = res[tool]
            ntr_s, ntr_h, ns, nh = sizes[how]
            line += f"{f'{caught}/{ns} {100 * caught / ns:.0f}%':>16}{f'{fp}/{nh}':>13}"
            line += f"{f'{unk} {100 * unk / (ns + nh):.1f}%':>11}"
        print(line)
    for how in results:
        ntr_s, ntr_h, ns, nh = sizes[how]
        print(f"\n{how} split: trained on {ntr_s} spam + {ntr_h} ham; label per test folder")
        print(f"  {'tool':<12}{'folder':<12}{'yes':>6}{'unknown':>9}{'no':>6}")
        for tool in tools:
            c = per_folder[how][tool]
            for folder in folders:
                print(
                    f"  {tool:<12}{folder:<12}{c[(folder, 'yes')]:>6}"
                    f"{c[(folder, 'unknown')]:>9}{c[(folder, 'no')]:>6}"
                )

    ok = True
    for how in results:
        p = results[how]["poste"]
        refs = [results[how][t] for t in tools[1:]]
        ok_catch = all(p[0] > r[0] for r in refs)
        ok_fp = p[1] <= min(r[1] for r in refs)
        print(
            f"{how} split: poste catches more spam than both: {'yes' if ok_catch else 'NO'}; "
            f"false positives no more than the best: {'yes' if ok_fp else 'NO'}"
            + ("" if how == "random" else " (shown, not part of the exit status: see docs)")
        )
        # the time split's false positives are a known open problem
        # (docs/spamfilter.md, "What is weak"); the exit status guards the rest
        ok = ok and ok_catch and (ok_fp or how != "random")
    if accuracy_only:
        return 0 if ok else 1
    assert time_cmds is not None
    fast = speed(time_test, time_cmds, runs, copies)
    return 0 if ok and fast else 1


def speed(test: Path, cmds_of: Commands, runs: int, copies: int) -> bool:
    """Mails/s of each classifying command on the time split's test mbox and on N copies."""
    big = test.parent / "speed.mbox"
    big.write_bytes(test.read_bytes() * copies)
    n = test.read_bytes().count(b"\nFrom ") + 1
    rows: dict[tuple[str, int], list[tuple[float, float]]] = {}

    def timed_of(mbox: Path) -> dict[str, list[str]]:
        cmds = cmds_of(mbox)
        db = cmds["poste"][cmds["poste"].index("--db") + 1]
        return {
            "poste classify -j1": [POSTE, "spam", "classify", "-j1", "--db", db, str(mbox)],
            "poste mark -j1": [POSTE, "spam", "mark", "-j1", "--db", db, str(mbox)],
            "poste mark": cmds["poste"],
            "spamoracle mark": cmds["spamoracle"],
            "bogofilter -t": cmds["bogofilter"],
        }

    # one untimed run of every command first, so that no tool's first timed
    # run pays for what the others had warm: the page cache of its database,
    # and for `poste spam classify` the weight-table cache of a database
    # trained just before (`mark` does not use that cache)
    for cmd in timed_of(test).values():
        run(cmd)
    for _ in range(runs):
        for mbox, k in ((test, 1), (big, copies)):
            for tool, cmd in timed_of(mbox).items():
                rows.setdefault((tool, k), []).append(run(cmd))
    print(
        f"\nspeed: mails per wall-clock second of the whole command (start-up included), "
        f"{runs} runs interleaved; time split test mbox ({n} mails) and {copies} copies of it"
    )
    print(
        f"{'command':<20}{'test mbox: runs':>26}{f'x{copies}: runs':>26}{'cpu s x' + str(copies):>12}"
    )
    best: dict[tuple[str, int], float] = {}
    for tool in dict.fromkeys(t for t, _ in rows):
        cells = []
        for k in (1, copies):
            rates = [n * k / wall for wall, _ in rows[(tool, k)]]
            best[(tool, k)] = max(rates)
            cells.append(" ".join(f"{r:.0f}" for r in rates))
        cpu = min(c for _, c in rows[(tool, copies)])
        print(f"{tool:<20}{cells[0]:>26}{cells[1]:>26}{cpu:>12.2f}")
    ok = True
    for k in (1, copies):
        faster = [
            min(n * k / w for w, _ in rows[("poste classify -j1", k)]) >= r
            for r in [n * k / w for w, _ in rows[("spamoracle mark", k)]]
        ]
        a, b = best[("poste classify -j1", k)], best[("spamoracle mark", k)]
        # the medians too: the best run alone hides how far the runs spread
        ma, mb = (
            statistics.median(n * k / w for w, _ in rows[(tool, k)])
            for tool in ("poste classify -j1", "spamoracle mark")
        )
        print(
            f"{'test mbox' if k == 1 else f'x{k} mbox'}: poste classify -j1 best {a:.0f} vs "
            f"spamoracle mark best {b:.0f} mails/s ({a / b:.2f}x; medians {ma:.0f} vs "
            f"{mb:.0f}, {ma / mb:.2f}x); "
            f"slowest poste run above every spamoracle run: {'yes' if all(faster) else 'NO'}"
        )
        ok = ok and a >= b
    return ok


if __name__ == "__main__":
    sys.exit(main())
