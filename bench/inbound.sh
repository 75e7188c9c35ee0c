#!/usr/bin/env bash
# inbound.sh -- poste's receiving path against Postfix + policyd-spf + OpenDKIM, same script,
# rounds interleaved. Run by hand, as root, never by the test suite; loopback only.
#
#   smtp-source --> postfix smtpd (+ policyd-spf, OpenDKIM milter) --> queue --> smtp-sink
#   smtp-source --> poste up (verifier -> spamfilter -> relay in memory) --> spool --> smtp-sink
#   smtp-source --> poste verifier --unix--> spamfilter --unix--> relay --> spool --> smtp-sink
#
# Everything the Postfix side does, and the helpers (nsd without its rate limit, opendkim's
# resolver, the DKIM-signed message, smtp-source/smtp-sink, cgroup CPU accounting, clean-up),
# comes from ../shared/bench/postfix_ref.sh, which this script sources without its main part:
# the same message, the same nsd zone and the same load generator for every variant.
#
# poste's side: the verifier listens on 127.0.0.2 (the sink is on 127.0.0.1, the A of
# example.net; the relay bounces mail whose MX is an address it listens on), rcpt@example.org
# is a forward-only user whose target is rcpt@example.net (the sink), so each mail passes SPF
# (ip4:127.0.0.0/8), DKIM (rsa-sha256, key in nsd), DMARC lookup, rDNS, the spam classifier,
# SRS and the spool with fsync. Drained = no envelope left in the spool. CPU: one cgroup per
# poste process (exited threads included), nsd apart; RSS: VmHWM of each poste process;
# spool_peak: the most envelopes in the spool at once during the load (sampled at 5 Hz).
#
# Prints, per round and variant: delivered msg/s, CPU ms per mail per process, and the
# ratios poste/Postfix of the same round; then median [min-max] over the rounds.
#
# Usage: bash bench/inbound.sh [--size 5k|100k|1m|BYTES] [--sessions S] [-n N] [--rounds R]
#                              [--variants "postfix up separate"] [--workers N|auto] [--keep]
#   --workers: each poste command's worker processes (default 1, as before the option existed)
#   up-base, separate-base: the same with POSTE_BASE (another poste, e.g. a wrapper that puts
#     main's src first on PYTHONPATH), so a before/after comparison shares the rounds
# Env (as postfix_ref.sh): WARMUP SMTPD_PORT SINK_PORT DNS_PORT POSTE=path/to/poste POSTE_BASE
#     POSTFIX_REF=path/to/postfix_ref.sh PROFILE=1 (py-spy record each poste process, if
#     .venv/bin/py-spy exists: profile.txt for `up`, profile-verifier.txt etc. for separate,
#     beside the logs, which are kept then)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REF=${POSTFIX_REF:-$ROOT/../shared/bench/postfix_ref.sh}
POSTE=${POSTE:-$ROOT/.venv/bin/poste}
ROUNDS=3
POSTE_VARIANTS="postfix up separate"
WORKERS=1
size_of() {
    case "$1" in
        *[kK]) echo $(( ${1%[kK]} * 1000 )) ;;
        *[mM]) echo $(( ${1%[mM]} * 1000000 )) ;;
        *[!0-9]*|"") echo "bad size: $1" >&2; exit 2 ;;
        *) echo "$1" ;;
    esac
}
while [ $# -gt 0 ]; do
    case "$1" in
        --size) SIZE=$(size_of "$2"); shift 2 ;;
        --sessions) SESSIONS=$2; shift 2 ;;
        -n) N=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --variants) POSTE_VARIANTS=$2; shift 2 ;;
        --workers) WORKERS=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,33p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -f "$REF" ] || { echo "no $REF (set POSTFIX_REF)" >&2; exit 2; }
[ -x "$POSTE" ] || { echo "no $POSTE (make the venv, or set POSTE)" >&2; exit 2; }
# Ports of their own, so that a postfix_ref.sh run by someone else at the same time does not clash.
SMTPD_PORT=${SMTPD_PORT:-2725} SINK_PORT=${SINK_PORT:-2726} DNS_PORT=${DNS_PORT:-5453}
MILTER_PORT=${MILTER_PORT:-8991}
N=${N:-2000} SESSIONS=${SESSIONS:-10} SIZE=${SIZE:-5000} WARMUP=${WARMUP:-200} KEEP=${KEEP:-0}
export N SESSIONS SIZE WARMUP KEEP SMTPD_PORT SINK_PORT DNS_PORT MILTER_PORT
[ "${PROFILE:-0}" = 1 ] && KEEP=1

# The reference's definitions, settings, checks and EXIT trap, without its main part.
# shellcheck disable=SC1090
source <(sed '/^# -* main$/,$d' "$REF")
# shellcheck source=bench/poste_procs.sh
source "$ROOT/bench/poste_procs.sh"

POSTE_HOST=127.0.0.2
PDOMAIN=example.org    # ours
send_poste() {   # $1 count, $2 sessions, $3 cgroup: the reference's load, to our listener
    ( cg_join "$3"; exec smtp-source -s "$2" -m "$1" -F "$BASE/msg/msg.eml" -M "$HELO" \
          -f "$SENDER" -t "$RCPT" "$POSTE_HOST:$SMTPD_PORT" )
}

setup_poste() {   # $1 dir, $2 topology, $3 variant: starts the processes, waits until they listen
    local d=$1 topo=$2 v=$3
    mkdir -p "$d"
    "$POSTE" users add rcpt --repo "$d/users" --target "$SENDER_SINK" --no-password >/dev/null
    "$POSTE" users add postmaster --repo "$d/users" --target "postmaster@example.net" \
        --no-password >/dev/null
    local ns="127.0.0.1:$DNS_PORT"
    if [ "$topo" = up ]; then
        cat > "$d/poste.toml" <<EOF
domain = ["$PDOMAIN"]
postmaster = "postmaster@$PDOMAIN"
users = "$d/users"
nameserver = ["$ns"]
[verifier]
listen = "$POSTE_HOST:$SMTPD_PORT"
hostname = "$MYHOST"
[spamfilter]
hostname = "spamfilter.$PDOMAIN"
[relay]
spool = "$d/spool"
hostname = "relay.$PDOMAIN"
smtp-port = $SINK_PORT
no-ipv6 = true
[submission]
enabled = false
[signer]
enabled = false
EOF
        start_poste up "$v-up" "$d/up.log" up --config "$d/poste.toml" --workers "$WORKERS"
    else
        start_poste relay "$v-relay" "$d/relay.log" relay --domain "$PDOMAIN" \
            --postmaster "postmaster@$PDOMAIN" --users "$d/users" --spool "$d/spool" \
            --listen "unix:$d/relay.sock" --nameserver "$ns" --smtp-port "$SINK_PORT" \
            --no-ipv6 --hostname "relay.$PDOMAIN" --workers "$WORKERS"
        start_poste spamfilter "$v-spamfilter" "$d/spamfilter.log" spamfilter \
            --listen "unix:$d/spam.sock" --destination "unix:$d/relay.sock" \
            --hostname "spamfilter.$PDOMAIN" --workers "$WORKERS"
        start_poste verifier "$v-verifier" "$d/verifier.log" verifier --domain "$PDOMAIN" \
            --postmaster "postmaster@$PDOMAIN" --destination "unix:$d/spam.sock" \
            --listen "$POSTE_HOST:$SMTPD_PORT" --nameserver "$ns" --hostname "$MYHOST" --workers "$WORKERS"
        wait_listen "$d/relay.sock" && wait_listen "$d/spam.sock" \
            || { tail -5 "$d"/*.log >&2; die "poste $topo did not start"; }
    fi
    wait_listen "$POSTE_HOST:$SMTPD_PORT" || { tail -5 "$d"/*.log >&2; die "poste $topo did not start"; }
}

RESULTS=()   # "round variant delivered cpu_total detail"
run_poste() {   # $1 variant (up, separate, up-base, separate-base), $2 round
    local topo=${1%-base} r=$2 v=poste-$1 d=$BASE/poste-$1-$2 k t0 t1 t2 names groups
    # the -base variants run POSTE_BASE: start_poste and setup_poste see this POSTE
    local POSTE=$POSTE
    if [ "$1" != "$topo" ]; then POSTE=${POSTE_BASE:?set POSTE_BASE for the -base variants}; fi
    log "=== poste $1 (round $r): N=$N sessions=$SESSIONS size=$SIZE"
    if [ "$topo" = up ]; then names="up"; else names="verifier spamfilter relay"; fi
    groups="$names nsd source sink"
    for k in $groups; do cg_make "$v-$k"; done
    mkdir -p "$d"; start_nsd "$d" "$v-nsd"

    # functional check: one mail, dumped by the sink, with SPF and DKIM passed
    start_sink "$d" "$v-sink" "$d/sinkdump"
    setup_poste "$d" "$topo" "$v"
    send_poste 1 1 "$v-source" >/dev/null || die "poste: check message refused"
    wait_spool "$d/spool" "$(calc "$(now) + 60" 3)" || die "poste: check message not delivered"
    stop_sink
    cat "$d"/sinkdump/dump* > "$d/sink.dump" 2>/dev/null || true
    grep -q "spf=pass" "$d/sink.dump" || { head -40 "$d/sink.dump" >&2; die "poste: SPF did not pass"; }
    grep -q "dkim=pass" "$d/sink.dump" || { head -40 "$d/sink.dump" >&2; die "poste: DKIM did not verify"; }
    grep -q "^X-Spamtacus:" "$d/sink.dump" || { head -40 "$d/sink.dump" >&2; die "poste: no X-Spamtacus"; }
    log "check ok: spf=pass dkim=pass, X-Spamtacus present"

    start_sink "$d" "$v-sink"
    if [ "$WARMUP" -gt 0 ]; then
        send_poste "$WARMUP" "$SESSIONS" "$v-source" >/dev/null || die "poste: warm-up refused"
        wait_spool "$d/spool" "$(calc "$(now) + 120" 3)" || die "poste: warm-up not delivered"
    fi
    sleep 1
    declare -A cpu0 cpu
    cpu_mark "$v" $groups
    local prof_pids=() e
    if [ "${PROFILE:-0}" = 1 ] && [ -x "$ROOT/.venv/bin/py-spy" ]; then
        # one profile per poste process (profile-verifier.txt ...; `up`: profile.txt)
        for e in "${PROCS[@]}"; do
            local pf="$d/profile-${e%%:*}.txt"
            [ "$topo" = up ] && pf="$d/profile.txt"
            "$ROOT/.venv/bin/py-spy" record --gil --subprocesses -r 100 -f raw -o "$pf" \
                -p "${e#*:}" > "$d/py-spy-${e%%:*}.out" 2>&1 &
            prof_pids+=("$!")
        done
    fi
    # the spool's largest backlog while mail comes in (envelopes, sampled 5 times a second)
    echo 0 > "$d/spool.peak"
    (
        peak=0
        while :; do
            n=$(spool_count "$d/spool")
            if [ "$n" -gt "$peak" ]; then peak=$n; echo "$peak" > "$d/spool.peak"; fi
            sleep 0.2
        done
    ) &
    local sampler=$!; PIDS_TO_KILL+=("$sampler")
    t0=$(now)
    send_poste "$N" "$SESSIONS" "$v-source" >/dev/null || die "poste: smtp-source failed (mail refused?)"
    t1=$(now)
    wait_spool "$d/spool" "$(calc "$t1 + $DRAIN_TIMEOUT" 3)" || die "poste: spool did not drain"
    t2=$(now)
    kill_pid "$sampler"; forget_pid "$sampler"
    for e in "${prof_pids[@]}"; do kill -INT "$e" 2>/dev/null; wait "$e" 2>/dev/null || true; done
    cpu_spent "$v" $groups
    local rss
    rss=$(procs_rss)
    stop_sink; stop_poste; kill_pid "$NSD_PID"; forget_pid "$NSD_PID"
    check_sent "$d" "$N"

    local total=0 per=""
    for k in $names nsd; do total=$((total + ${cpu[$k]:-0})); per+=" $k=$(ms "${cpu[$k]}")"; done
    local acc dlv
    acc=$(calc "$N / ($t1 - $t0)" 1); dlv=$(calc "$N / ($t2 - $t0)" 1)
    RESULTS+=("$r $v $dlv $(ms "$total") accept=$acc cpu_ms_per_msg: total=$(ms "$total")$per \
smtp_source=$(ms "${cpu[source]}") smtp_sink=$(ms "${cpu[sink]}") spool_peak=$(cat "$d/spool.peak") \
drain_after_load_s=$(calc "$t2 - $t1" 2) rss_peak:$rss")
    log "${RESULTS[-1]}"
}

run_postfix() {   # $1 round: the reference's spf-dkim variant, in a fresh instance folder
    local r=$1 line detail dlv tot
    rm -rf "${BASE:?}/spf-dkim"
    run_variant spf-dkim
    line=${SUMMARY[-2]}; detail=${SUMMARY[-1]}
    dlv=$(sed -n 's/.* delivered=\([0-9.]*\).*/\1/p' <<<"$line")
    tot=$(sed -n 's/.*mta_total=\([0-9.n/a]*\).*/\1/p' <<<"$detail")
    RESULTS+=("$r postfix $dlv $tot ${detail#*: }")
}

# ---------------------------------------------------------------- main
install_deps
for p in "$SMTPD_PORT" "$SINK_PORT" "$DNS_PORT" "$MILTER_PORT"; do
    ss -ltun 2>/dev/null | awk '{print $5}' | grep -qE "[:.]$p\$" && die "port $p already in use"
done
BASE=$(mktemp -d /tmp/poste-inbound.XXXXXX)
chmod 755 "$BASE"
cg_setup
make_message "$BASE/msg"
SENDER_SINK=rcpt@example.net
for r in $(seq "$ROUNDS"); do
    for v in $POSTE_VARIANTS; do
        case "$v" in
            postfix) run_postfix "$r" ;;
            up|separate|up-base|separate-base) run_poste "$v" "$r" ;;
            *) die "unknown variant $v" ;;
        esac
    done
done

echo "# inbound: N=$N sessions=$SESSIONS size=$SIZE rounds=$ROUNDS warmup=$WARMUP workers=$WORKERS, $(nproc) cpus," \
     "poste $("$POSTE" --version 2>/dev/null | awk '{print $NF}'), $(postconf -d -h mail_version 2>/dev/null | sed 's/^/postfix /')"
echo "# per round: round variant delivered_msg_s cpu_ms_per_mail(total) details"
printf '%s\n' "${RESULTS[@]}"
# ratios against the Postfix run of the same round; then median [min-max]
printf '%s\n' "${RESULTS[@]}" | awk '
    { dl[$1, $2] = $3; cpu[$1, $2] = $4; vs[$2] = 1; rs[$1] = 1 }
    function stats(a, n,   i, j, t, s) {
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        s = (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        return sprintf("%.2f [%.2f-%.2f]", s, a[1], a[n])
    }
    END {
        print "# variant: delivered msg/s | cpu ms per mail | delivered ratio to postfix | cpu ratio to postfix (median [min-max] over rounds)"
        for (v in vs) {
            n = 0; m = 0; k = 0
            delete d; delete c; delete rd; delete rc
            for (r in rs) {
                if ((r, v) in dl) { n++; d[n] = dl[r, v]; c[n] = cpu[r, v] }
                if (v != "postfix" && (r, v) in dl && (r, "postfix") in dl && dl[r, "postfix"] > 0) {
                    k++; rd[k] = dl[r, v] / dl[r, "postfix"]
                    if (cpu[r, "postfix"] > 0) { m++; rc[m] = cpu[r, v] / cpu[r, "postfix"] }
                }
            }
            printf "%-16s delivered %s | cpu %s", v, stats(d, n), stats(c, n)
            if (k) printf " | x postfix: delivered %s", stats(rd, k)
            if (m) printf ", cpu %s", stats(rc, m)
            printf "\n"
        }
    }'
