#!/usr/bin/env bash
# outbound.sh -- poste's sending path against Postfix + Cyrus SASL + OpenDKIM, same script,
# rounds interleaved. Run by hand, as root, never by the test suite; loopback only.
#
#   smtp_load.py --TLS+AUTH--> postfix smtpd (Cyrus SASL, sasldb; OpenDKIM milter, signing)
#                              --> queue --> smtp-sink
#   smtp_load.py --TLS+AUTH--> poste up (submission -> signer -> relay in memory) --> spool
#                              --> smtp-sink
#   smtp_load.py --TLS+AUTH--> poste submission --unix--> signer --unix--> relay --> spool
#                              --> smtp-sink
#
# smtp-source cannot AUTH, so both sides get the same Python client (bench/smtp_load.py:
# asyncio + the stdlib's ssl, N mails over S sessions at once, M mails per session, each
# session EHLO, STARTTLS (or TLS from the first byte: --tls implicit), EHLO, AUTH PLAIN;
# session i connects from 127.0.1.(i+1), one address per mail client: poste's AUTH brake
# checks one login per client address at a time and answers 454 to more than two waiting).
# Everything else comes from ../shared/bench/postfix_ref.sh, sourced without its main part:
# nsd (rate limit off), cgroup CPU accounting, smtp-sink, the kill-by-PID clean-up.
#
# The sender is alice@out.example.net (a user with a password, argon2id, in poste's users
# repository; the same password in Postfix's sasldb), the recipient rcpt@example.net, whose
# A record is 127.0.0.1: the sink. Both MTAs listen on 127.0.0.2, sign with the same RSA-2048
# key (made by `poste dkim keygen`, its TXT record served by the bench's nsd as
# bench2._domainkey.out.example.net), both refuse a MAIL FROM the login does not own
# (Postfix: reject_sender_login_mismatch; poste also checks the header From, which Postfix
# does not). Before each measured run one mail goes through the path and the sink's copy
# must carry a DKIM-Signature with d=out.example.net that dkimpy verifies against that nsd
# (bench/dkim_check.py). Drained = Postfix's queue / poste's spool empty again.
# Not the same work: sasldb keeps the password in clear (a check is a string compare), poste
# keeps an argon2id hash (one check: ~25 ms of CPU), which its login cache (--auth-cache,
# default 60 s) pays once per user and minute. The client never resumes a TLS session:
# every session is a full handshake on both sides.
#
# Prints, per round, per-session count and variant: delivered msg/s (N / from the first
# connection until the queue is empty), the client's own rate (accept), CPU ms per mail per
# process (cgroups: Postfix = all its processes + opendkim + nsd; poste = its processes +
# nsd; the client and the sink apart) and the ratios to Postfix of the same round; then
# median [min-max] over the rounds.
#
# Variants: postfix; up (`poste up`); separate (three processes); up-nocache (`poste up`
# with [submission] auth-cache = 0: every AUTH costs one argon2id check, as before the login
# cache).
#
# Usage: bash bench/outbound.sh [-n N] [--sessions S] [--per-session "1 20"] [--rounds R]
#                               [--tls starttls|implicit] [--size BYTES]
#                               [--variants "postfix up separate up-nocache"] [--workers N|auto]
#                               [--keep]
#   --workers: worker processes of `poste up`, and of the separate relay and signer (default 1,
#   as before the option existed). Submission is one process in both (its AUTH brake is one
#   process's): in `up` it runs in worker 0, and the other workers' relays get nothing to send.
# Env: WARMUP (mails, default 50) SUB_PORT SINK_PORT DNS_PORT POSTE=path/to/poste
#      POSTFIX_REF=path/to/postfix_ref.sh PROFILE=1 (py-spy record the `up` variant, if
#      .venv/bin/py-spy exists; the raw profile goes beside the logs, which are kept then)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REF=${POSTFIX_REF:-$ROOT/../shared/bench/postfix_ref.sh}
POSTE=${POSTE:-$ROOT/.venv/bin/poste}
PY=${PY:-$ROOT/.venv/bin/python}
ROUNDS=3
PER_SESSION="1 20"
TLS_MODE=starttls
POSTE_VARIANTS="postfix up separate up-nocache"
WORKERS=1
while [ $# -gt 0 ]; do
    case "$1" in
        -n) N=$2; shift 2 ;;
        --sessions) SESSIONS=$2; shift 2 ;;
        --per-session) PER_SESSION=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --tls) TLS_MODE=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --variants) POSTE_VARIANTS=$2; shift 2 ;;
        --workers) WORKERS=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,54p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$TLS_MODE" in starttls|implicit) ;; *) echo "--tls: starttls or implicit" >&2; exit 2 ;; esac
for m in $PER_SESSION; do
    case "$m" in ''|*[!0-9]*|0) echo "--per-session: positive numbers ($m)" >&2; exit 2 ;; esac
done
[ -f "$REF" ] || { echo "no $REF (set POSTFIX_REF)" >&2; exit 2; }
[ -x "$POSTE" ] || { echo "no $POSTE (make the venv, or set POSTE)" >&2; exit 2; }
# Ports of their own, so that inbound.sh or postfix_ref.sh run by someone else do not clash.
SUB_PORT=${SUB_PORT:-2587} SINK_PORT=${SINK_PORT:-2588} DNS_PORT=${DNS_PORT:-5455}
N=${N:-500} SESSIONS=${SESSIONS:-10} SIZE=${SIZE:-5000} WARMUP=${WARMUP:-50} KEEP=${KEEP:-0}
# the reference reads these at source time: its SMTPD_PORT/MILTER_PORT are unused here
SMTPD_PORT=$SUB_PORT MILTER_PORT=0 LOAD=generated
export N SESSIONS SIZE WARMUP KEEP SMTPD_PORT SINK_PORT DNS_PORT MILTER_PORT LOAD
[ "${PROFILE:-0}" = 1 ] && KEEP=1

# The reference's definitions, settings, checks and EXIT trap, without its main part.
# shellcheck disable=SC1090
source <(sed '/^# -* main$/,$d' "$REF")
# shellcheck source=bench/poste_procs.sh
source "$ROOT/bench/poste_procs.sh"

HOST=127.0.0.2                 # both MTAs' submission listener
ODOMAIN=out.example.net        # the sending domain (a subzone of the reference's example.net)
LOGIN=alice@$ODOMAIN
SENDER=$LOGIN
RCPT=rcpt@example.net          # A 127.0.0.1 in the reference's zone: the sink
SELECTOR=bench2
SUBHOST=mail.$ODOMAIN

install_out_deps() {   # sasl2-bin for saslpasswd2, libsasl2-modules for PLAIN/LOGIN + sasldb
    [ -x /usr/sbin/saslpasswd2 ] && [ -e /usr/lib/x86_64-linux-gnu/sasl2/libsasldb.so ] \
        && [ -e /usr/lib/x86_64-linux-gnu/sasl2/libplain.so ] && return 0
    local created=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then   # sasl2-bin ships saslauthd: do not start it
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
        created=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y sasl2-bin libsasl2-modules \
        || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y sasl2-bin libsasl2-modules; }
    if [ "$created" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}

# ---------------------------------------------------------------- shared material
make_material() {   # $1 dir: message, password, TLS certificate, DKIM key + its TXT record
    local d=$1
    mkdir -p "$d"; chmod 755 "$d"
    make_message "$d"   # LOAD=generated: the unsigned message, From $SENDER, To $RCPT
    head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$d/password"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=$SUBHOST" \
        -keyout "$d/tls.key" -out "$d/tls.crt" 2>/dev/null
    chmod 644 "$d/tls.key" "$d/tls.crt"   # postfix (root) and poste (root) read it
    "$POSTE" dkim keygen --algorithm rsa --selector "$SELECTOR" --domain "$ODOMAIN" \
        -o "$d/dkim.pem" > "$d/dkim.record"
    # start_nsd puts $BASE/msg/bench.txt into the example.net zone; the record's name is in it
    grep '^[^;]*_domainkey' "$d/dkim.record" > "$d/bench.txt" || true
    grep -q 'v=DKIM1' "$d/bench.txt" || { cat "$d/dkim.record" >&2; die "no DKIM record from poste dkim keygen"; }
}

load() {   # $1 count, $2 sessions, $3 per session, $4 cgroup: prints the client's line
    ( cg_join "$4"; exec "$PY" "$ROOT/bench/smtp_load.py" --server "$HOST:$SUB_PORT" \
          --tls "$TLS_MODE" --login "$LOGIN" --password-file "$BASE/msg/password" \
          -f "$SENDER" -t "$RCPT" -n "$1" -s "$2" -m "$3" --source-net 127.0.1 "$BASE/msg/msg.eml" )
}
check_dump() {   # $1 dir with sinkdump/: the check mail is there and its signature verifies
    cat "$1"/sinkdump/dump* > "$1/sink.dump" 2>/dev/null || true
    "$PY" "$ROOT/bench/dkim_check.py" --nameserver "127.0.0.1:$DNS_PORT" --domain "$ODOMAIN" \
        "$1/sink.dump" || { head -40 "$1/sink.dump" >&2; die "$2: the check mail's DKIM signature"; }
}

RESULTS=()   # "round variant/M delivered cpu_total detail"

# ---------------------------------------------------------------- Postfix
write_postfix_out() {   # $1 instance dir
    local d=$1 wrap=""
    [ "$TLS_MODE" = implicit ] && wrap="-o smtpd_tls_wrappermode=yes"
    mkdir -p "$d/conf/sasl" "$d/queue" "$d/data" "$d/opendkim"
    chown postfix "$d/data"
    cat > "$d/conf/main.cf" <<EOF
# private benchmark instance -- not the system's /etc/postfix
compatibility_level = 3.6
config_directory = $d/conf
queue_directory = $d/queue
data_directory = $d/data
mail_owner = postfix
setgid_group = postdrop
myhostname = $SUBHOST
mydomain = $ODOMAIN
myorigin = \$myhostname
# 127.0.0.2 is no interface address (lo has 127.0.0.1/8): master.cf names it itself
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# nothing relays unauthenticated (opendkim's InternalHosts 127.0.0.1 still signs everything)
mynetworks = 192.0.2.1/32
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
local_transport = error:local delivery is disabled
relay_domains =
transport_maps = inline:{ example.net=smtp:[127.0.0.1]:$SINK_PORT }
relay_transport = error:benchmark: no relay outside transport_maps
default_transport = error:benchmark: no outside delivery
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtpd_tls_cert_file = $BASE/msg/tls.crt
smtpd_tls_key_file = $BASE/msg/tls.key
smtpd_tls_auth_only = yes
# no PTR lookup of the client (127.0.1.x are not in /etc/hosts: each would go to the
# machine's resolver, off the machine, and some stalled 5 s); poste's submission does none
smtpd_peername_lookup = no
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = $d/conf/sasl
smtpd_sasl_security_options = noanonymous
smtpd_sender_login_maps = inline:{ $LOGIN=$LOGIN }
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_milters = unix:$d/opendkim/milter.sock
non_smtpd_milters =
milter_default_action = tempfail
milter_protocol = 6
biff = no
maillog_file = $d/maillog
maillog_file_prefixes = /tmp, /var
EOF
    cat > "$d/conf/master.cf" <<EOF
# service type  private unpriv  chroot  wakeup  maxproc command + args
$HOST:$SUB_PORT inet n - n - - smtpd
    -o smtpd_tls_security_level=encrypt $wrap
    -o smtpd_sasl_auth_enable=yes
    -o smtpd_sender_restrictions=reject_sender_login_mismatch
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
    # Cyrus SASL inside smtpd: sasldb (auxprop), the password as poste's user has it
    cat > "$d/conf/sasl/smtpd.conf" <<EOF
pwcheck_method: auxprop
auxprop_plugin: sasldb
mech_list: PLAIN LOGIN
sasldb_path: $d/conf/sasl/sasldb2
EOF
    saslpasswd2 -p -c -f "$d/conf/sasl/sasldb2" -u "$ODOMAIN" "${LOGIN%@*}" < "$BASE/msg/password"
    chown postfix "$d/conf/sasl/sasldb2"; chmod 640 "$d/conf/sasl/sasldb2"
    # OpenDKIM, signing with poste's key (the same bytes of key, the same selector)
    chmod 755 "$d/opendkim"; chown opendkim "$d/opendkim"
    install -o opendkim -m 600 "$BASE/msg/dkim.pem" "$d/opendkim/dkim.pem"
    cat > "$d/opendkim/opendkim.conf" <<EOF
Mode                    s
Socket                  local:$d/opendkim/milter.sock
UserID                  opendkim
Syslog                  no
Domain                  $ODOMAIN
Selector                $SELECTOR
KeyFile                 $d/opendkim/dkim.pem
Canonicalization        relaxed/relaxed
SignatureAlgorithm      rsa-sha256
OversignHeaders         From
Nameservers             127.0.0.1@$DNS_PORT
UMask                   000
# the key lies under /tmp (world-writable): opendkim would refuse it otherwise
RequireSafeKeys         no
EOF
}

start_postfix_out() {   # $1 instance dir, $2 cgroup
    local d=$1 i
    postfix -c "$d/conf" check || die "postfix check failed"
    POSTFIX_DIRS+=("$d")
    ( cg_join "$2"; postfix -c "$d/conf" start ) || die "postfix start failed"
    wait_listen "$HOST:$SUB_PORT" || { tail -20 "$d/maillog" >&2; die "postfix not listening on $HOST:$SUB_PORT"; }
}

run_postfix() {   # $1 round, $2 mails per session
    local r=$1 m=$2 v=pf-out d=$BASE/postfix-$1-$2 k t0 t1 t2 sent0 sent1 i out
    local groups="postfix opendkim nsd source sink"
    log "=== postfix (round $r, $m per session): N=$N sessions=$SESSIONS size=$SIZE tls=$TLS_MODE"
    for k in $groups; do cg_make "$v-$k"; done
    mkdir -p "$d"; chmod 755 "$d"
    write_postfix_out "$d"
    start_nsd "$d" "$v-nsd"
    ( cg_join "$v-opendkim"; exec opendkim -f -x "$d/opendkim/opendkim.conf" ) > "$d/opendkim.out" 2>&1 &
    local dkim_pid=$!; PIDS_TO_KILL+=("$dkim_pid")
    for i in $(seq 50); do [ -S "$d/opendkim/milter.sock" ] && break; sleep 0.1; done
    [ -S "$d/opendkim/milter.sock" ] || { cat "$d/opendkim.out" >&2; die "opendkim did not start"; }

    start_sink "$d" "$v-sink" "$d/sinkdump"
    start_postfix_out "$d" "$v-postfix"
    load 1 1 1 "$v-source" >/dev/null || { tail -5 "$d/maillog" >&2; die "postfix: check message refused"; }
    wait_drained "$d" "$(calc "$(now) + 60" 3)" || die "postfix: check message not delivered"
    stop_sink
    check_dump "$d" postfix

    start_sink "$d" "$v-sink"
    if [ "$WARMUP" -gt 0 ]; then
        load "$WARMUP" "$SESSIONS" "$m" "$v-source" >/dev/null || die "postfix: warm-up refused"
        wait_drained "$d" "$(calc "$(now) + 120" 3)" || die "postfix: warm-up not delivered"
    fi
    sleep 1
    sent0=$(sent_count "$d")
    declare -A cpu0 cpu
    cpu_mark "$v" $groups
    t0=$(now)
    out=$(load "$N" "$SESSIONS" "$m" "$v-source") || die "postfix: mail refused ($out)"
    t1=$(now)
    wait_drained "$d" "$(calc "$t1 + $DRAIN_TIMEOUT" 3)" || die "postfix: queue did not drain"
    t2=$(now)
    cpu_spent "$v" $groups
    for i in $(seq 50); do   # postlogd writes asynchronously
        sent1=$(sent_count "$d"); [ $((sent1 - sent0)) -ge "$N" ] && break; sleep 0.1
    done
    [ $((sent1 - sent0)) -eq "$N" ] || log "WARNING: maillog shows $((sent1 - sent0)) status=sent, expected $N"
    stop_sink; postfix_stop "$d"
    kill_pid "$dkim_pid"; forget_pid "$dkim_pid"; kill_pid "$NSD_PID"; forget_pid "$NSD_PID"

    local total=0 per="" client
    for k in postfix opendkim nsd; do total=$((total + ${cpu[$k]:-0})); per+=" $k=$(ms "${cpu[$k]}")"; done
    client=$(sed -n 's/.*msg_per_s=\([0-9.]*\).*/\1/p' <<<"$out")
    RESULTS+=("$r postfix/$m $(calc "$N / ($t2 - $t0)" 1) $(ms "$total") client_msg_s=$client \
cpu_ms_per_msg: total=$(ms "$total")$per client=$(ms "${cpu[source]}") smtp_sink=$(ms "${cpu[sink]}") \
drain_after_load_s=$(calc "$t2 - $t1" 2) cores_busy=$(calc "$total / 1000000 / ($t2 - $t0)" 2)")
    log "${RESULTS[-1]}"
}

# ---------------------------------------------------------------- poste

setup_poste() {   # $1 dir, $2 topology (up, up-nocache, separate)
    local d=$1 topo=$2 v=po-$2 cache=60 listen_key=listen ns="127.0.0.1:$DNS_PORT"
    [ "$topo" = up-nocache ] && cache=0
    [ "$TLS_MODE" = implicit ] && listen_key=listen-tls
    mkdir -p "$d"
    "$POSTE" users add "${LOGIN%@*}" --repo "$d/users" --password-stdin < "$BASE/msg/password" >/dev/null
    "$POSTE" users add postmaster --repo "$d/users" --target "postmaster@example.net" \
        --no-password >/dev/null
    if [ "$topo" != separate ]; then
        cat > "$d/poste.toml" <<EOF
domain = ["$ODOMAIN"]
postmaster = "postmaster@$ODOMAIN"
users = "$d/users"
nameserver = ["$ns"]
tls-cert = "$BASE/msg/tls.crt"
tls-key = "$BASE/msg/tls.key"
[verifier]
enabled = false
[spamfilter]
enabled = false
[relay]
spool = "$d/spool"
hostname = "relay.$ODOMAIN"
smtp-port = $SINK_PORT
no-ipv6 = true
[submission]
$listen_key = "$HOST:$SUB_PORT"
hostname = "$SUBHOST"
auth-cache = $cache
[signer]
hostname = "signer.$ODOMAIN"
selector = ["$SELECTOR"]
private-key = ["$BASE/msg/dkim.pem"]
EOF
        start_poste up "$v-up" "$d/up.log" up --config "$d/poste.toml" --workers "$WORKERS"
    else
        # the relay's TCP listener would default to 127.0.0.1:2525, and the sink's address
        # would then be ours (a loop): the relay listens on a socket, the signer uses its
        # local socket (mail from there may go anywhere)
        start_poste relay "$v-relay" "$d/relay.log" relay --domain "$ODOMAIN" \
            --postmaster "postmaster@$ODOMAIN" --users "$d/users" --spool "$d/spool" \
            --listen "unix:$d/relay.sock" --local-socket "$d/local.sock" --nameserver "$ns" \
            --smtp-port "$SINK_PORT" --no-ipv6 --hostname "relay.$ODOMAIN" \
            --dkim-selector "$SELECTOR" --dkim-key "$BASE/msg/dkim.pem" --workers "$WORKERS"
        wait_listen "$d/local.sock" || { tail -5 "$d"/*.log >&2; die "poste relay did not start"; }
        start_poste signer "$v-signer" "$d/signer.log" signer --domain "$ODOMAIN" \
            --selector "$SELECTOR" --private-key "$BASE/msg/dkim.pem" \
            --listen "unix:$d/signer.sock" --destination "unix:$d/local.sock" \
            --hostname "signer.$ODOMAIN" --workers "$WORKERS"
        wait_listen "$d/signer.sock" || { tail -5 "$d"/*.log >&2; die "poste signer did not start"; }
        # the same auth-state file poste up keeps by default (its writes are part of a login)
        start_poste submission "$v-submission" "$d/submission.log" submission \
            --domain "$ODOMAIN" --users "$d/users" --destination "unix:$d/signer.sock" \
            --tls-cert "$BASE/msg/tls.crt" --tls-key "$BASE/msg/tls.key" \
            "--$listen_key" "$HOST:$SUB_PORT" --hostname "$SUBHOST" --auth-cache "$cache" \
            --auth-state "$d/submission-auth.json" --workers 1
    fi
    wait_listen "$HOST:$SUB_PORT" || { tail -5 "$d"/*.log >&2; die "poste $topo did not start"; }
}

run_poste() {   # $1 topology, $2 round, $3 mails per session
    local topo=$1 r=$2 m=$3 v=po-$1 d=$BASE/poste-$1-$2-$3 k t0 t1 t2 names groups out
    log "=== poste $topo (round $r, $m per session): N=$N sessions=$SESSIONS size=$SIZE tls=$TLS_MODE"
    if [ "$topo" = separate ]; then names="submission signer relay"; else names="up"; fi
    groups="$names nsd source sink"
    for k in $groups; do cg_make "$v-$k"; done
    mkdir -p "$d"; start_nsd "$d" "$v-nsd"

    start_sink "$d" "$v-sink" "$d/sinkdump"
    setup_poste "$d" "$topo"
    load 1 1 1 "$v-source" >/dev/null || { tail -5 "$d"/*.log >&2; die "poste: check message refused"; }
    wait_spool "$d/spool" "$(calc "$(now) + 60" 3)" || die "poste: check message not delivered"
    stop_sink
    check_dump "$d" "poste $topo"

    start_sink "$d" "$v-sink"
    if [ "$WARMUP" -gt 0 ]; then
        load "$WARMUP" "$SESSIONS" "$m" "$v-source" >/dev/null || die "poste: warm-up refused"
        wait_spool "$d/spool" "$(calc "$(now) + 120" 3)" || die "poste: warm-up not delivered"
    fi
    sleep 1
    declare -A cpu0 cpu
    cpu_mark "$v" $groups
    local prof_pid=""
    if [ "${PROFILE:-0}" = 1 ] && [ "$topo" = up ] && [ -x "$ROOT/.venv/bin/py-spy" ]; then
        "$ROOT/.venv/bin/py-spy" record --gil -r 100 -f raw -o "$d/profile.txt" \
            -p "${PROCS[0]#*:}" > "$d/py-spy.out" 2>&1 &
        prof_pid=$!
    fi
    t0=$(now)
    out=$(load "$N" "$SESSIONS" "$m" "$v-source") || die "poste: mail refused ($out)"
    t1=$(now)
    wait_spool "$d/spool" "$(calc "$t1 + $DRAIN_TIMEOUT" 3)" || die "poste: spool did not drain"
    t2=$(now)
    [ -n "$prof_pid" ] && { kill -INT "$prof_pid" 2>/dev/null; wait "$prof_pid" 2>/dev/null || true; }
    cpu_spent "$v" $groups
    local rss
    rss=$(procs_rss)
    stop_sink; stop_poste; kill_pid "$NSD_PID"; forget_pid "$NSD_PID"
    check_sent "$d" "$N"

    local total=0 per="" client
    for k in $names nsd; do total=$((total + ${cpu[$k]:-0})); per+=" $k=$(ms "${cpu[$k]}")"; done
    client=$(sed -n 's/.*msg_per_s=\([0-9.]*\).*/\1/p' <<<"$out")
    RESULTS+=("$r $topo/$m $(calc "$N / ($t2 - $t0)" 1) $(ms "$total") client_msg_s=$client \
cpu_ms_per_msg: total=$(ms "$total")$per client=$(ms "${cpu[source]}") smtp_sink=$(ms "${cpu[sink]}") \
drain_after_load_s=$(calc "$t2 - $t1" 2) cores_busy=$(calc "$total / 1000000 / ($t2 - $t0)" 2) rss_peak:$rss")
    log "${RESULTS[-1]}"
}

# ---------------------------------------------------------------- main
install_deps
install_out_deps
for p in "$SUB_PORT" "$SINK_PORT" "$DNS_PORT"; do
    ss -ltun 2>/dev/null | awk '{print $5}' | grep -qE "[:.]$p\$" && die "port $p already in use"
done
BASE=$(mktemp -d /tmp/poste-outbound.XXXXXX)
chmod 755 "$BASE"
cg_setup
make_material "$BASE/msg"
for r in $(seq "$ROUNDS"); do
    for m in $PER_SESSION; do
        for v in $POSTE_VARIANTS; do
            case "$v" in
                postfix) run_postfix "$r" "$m" ;;
                up|separate|up-nocache) run_poste "$v" "$r" "$m" ;;
                *) die "unknown variant $v" ;;
            esac
        done
    done
done

echo "# outbound: N=$N sessions=$SESSIONS per_session=\"$PER_SESSION\" size=$SIZE tls=$TLS_MODE" \
     "workers=$WORKERS rounds=$ROUNDS warmup=$WARMUP, $(nproc) cpus, poste $("$POSTE" --version 2>/dev/null | awk '{print $NF}')," \
     "$(postconf -d -h mail_version 2>/dev/null | sed 's/^/postfix /')"
echo "# per round: round variant/per_session delivered_msg_s cpu_ms_per_mail(total) details"
printf '%s\n' "${RESULTS[@]}"
# ratios against the Postfix run of the same round and per-session count; then median [min-max]
printf '%s\n' "${RESULTS[@]}" | awk '
    { split($2, vp, "/"); v = vp[1]; m = vp[2]
      dl[$1, v, m] = $3; cpu[$1, v, m] = $4; vs[v "/" m] = 1; rs[$1] = 1 }
    function stats(a, n,   i, j, t, s) {
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        s = (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        return sprintf("%.2f [%.2f-%.2f]", s, a[1], a[n])
    }
    END {
        print "# variant/per_session: delivered msg/s | cpu ms per mail | x postfix of the same round: delivered, cpu (median [min-max] over rounds)"
        for (vm in vs) {
            split(vm, p, "/"); v = p[1]; m = p[2]
            n = 0; k = 0; c2 = 0
            delete d; delete c; delete rd; delete rc
            for (r in rs) {
                if ((r, v, m) in dl) { n++; d[n] = dl[r, v, m]; c[n] = cpu[r, v, m] }
                if (v != "postfix" && (r, v, m) in dl && (r, "postfix", m) in dl && dl[r, "postfix", m] > 0) {
                    k++; rd[k] = dl[r, v, m] / dl[r, "postfix", m]
                    if (cpu[r, "postfix", m] > 0) { c2++; rc[c2] = cpu[r, v, m] / cpu[r, "postfix", m] }
                }
            }
            printf "%-16s delivered %s | cpu %s", vm, stats(d, n), stats(c, n)
            if (k) printf " | x postfix: delivered %s", stats(rd, k)
            if (c2) printf ", cpu %s", stats(rc, c2)
            printf "\n"
        }
    }' | sort
