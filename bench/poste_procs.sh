# Helpers that bench/inbound.sh and bench/outbound.sh share for poste's side: starting and
# stopping poste processes in a cgroup, waiting for a listener and for an empty spool, the
# peak RSS of each poste process (a parent and each of its workers), CPU per cgroup and per
# mail. Sourced after ../shared/bench/postfix_ref.sh (its main part left out), whose
# cg_join, kill_pid, now, log and PIDS_TO_KILL they use.

# the reference's forget_pid returns the last comparison's status (set -e then stops the
# script when the PID was not the last one started): the same, returning 0
forget_pid() {
    local p=$1 i
    for i in "${!PIDS_TO_KILL[@]}"; do
        if [ "${PIDS_TO_KILL[$i]}" = "$p" ]; then unset 'PIDS_TO_KILL[i]'; fi
    done
    return 0
}

wait_listen() {   # $1 what ss prints (addr:port or socket path)
    local i
    for i in $(seq 300); do
        ss -ltnx 2>/dev/null | grep -qF "$1 " && return 0; sleep 0.1
    done
    return 1
}

PROCS=()   # name:pid of the running poste processes
start_poste() {   # $1 name, $2 cgroup, $3 log, args...
    local name=$1 cg=$2 out=$3; shift 3
    ( cg_join "$cg"; exec "$POSTE" "$@" ) > "$out" 2>&1 &
    PIDS_TO_KILL+=("$!"); PROCS+=("$name:$!")
}
stop_poste() {
    local e
    for e in "${PROCS[@]}"; do kill_pid "${e#*:}"; forget_pid "${e#*:}"; done
    PROCS=()
}
hwm_mb() { awk '/^VmHWM/{ printf "%.0f", $2/1024 }' "/proc/$1/status" 2>/dev/null || echo n/a; }

# envelopes in a spool and its workers' shards (worker-K/), not the quarantine's or the TLS cache's
spool_jsons() { find "$1" -maxdepth 2 -name '*.json' \( -path "$1/worker-*" -o ! -path "$1/*/*" \) "${@:2}" 2>/dev/null; }
spool_busy() { [ -n "$(spool_jsons "$1" -print -quit)" ]; }
spool_count() { spool_jsons "$1" | wc -l; }
wait_spool() {   # $1 spool, $2 deadline
    while spool_busy "$1"; do
        awk "BEGIN{exit !($(now) > $2)}" && { log "spool drain timeout"; return 1; }
        sleep 0.05
    done
}

# CPU of each cgroup "$v-$k" of a variant: cpu_mark before the load, cpu_spent after it. They
# fill the caller's associative arrays cpu0 and cpu (declare -A cpu0 cpu; bash's dynamic scope)
# in microseconds, empty when a cgroup was not readable.
cpu_mark() {   # $1 variant, then the groups
    local v=$1 k; shift
    for k in "$@"; do cpu0[$k]=$(cg_usec "$v-$k"); done
}
cpu_spent() {   # $1 variant, then the groups
    local v=$1 k c1; shift
    for k in "$@"; do
        c1=$(cg_usec "$v-$k"); cpu[$k]=""
        [ -n "$c1" ] && [ -n "${cpu0[$k]}" ] && cpu[$k]=$((c1 - ${cpu0[$k]}))
    done
    return 0
}
ms() { [ -n "$1" ] && calc "$1 / 1000 / $N" 3 || echo n/a; }   # microseconds to ms per mail

worker_of() {   # $1 pid: K of its POSTE_WORKER=K/N (runtime/workers.py), ? when unreadable
    local k
    k=$(tr '\0' '\n' < "/proc/$1/environ" 2>/dev/null | sed -n 's,^POSTE_WORKER=\([0-9]*\)/.*,\1,p')
    printf '%s' "${k:-?}"
}
procs_rss() {   # " name=NMB" for each running poste process, " name.wK=NMB" for each of its workers
    local e pid c out=""
    for e in "${PROCS[@]}"; do
        pid=${e#*:}
        out+=" ${e%%:*}=$(hwm_mb "$pid")MB"
        # with --workers N the started process is the parent; its children are the workers
        for c in $(pgrep -P "$pid" 2>/dev/null || true); do
            out+=" ${e%%:*}.w$(worker_of "$c")=$(hwm_mb "$c")MB"
        done
    done
    printf '%s' "$out"
}
check_sent() {   # $1 the folder of the poste logs, $2 the mails sent: warn if fewer were delivered
    local sent
    sent=$(cat "$1"/*.log | grep -c 'status=sent' || true)
    [ "$sent" -ge "$2" ] || log "WARNING: poste logs show $sent status=sent, expected >= $2"
}
