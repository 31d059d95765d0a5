#!/usr/bin/env bash
# Stop a cluster started by cluster/local/start.sh - and only that cluster.
#
#   cluster/local/stop.sh [--dir DIR] [--node NAME] [--grace SECONDS] [--kill]
#
#   --dir    the cluster dir given to start.sh [TMARS_CLUSTER_DIR or build/ray-local]
#   --node   stop one node (e.g. w1) and leave the rest running (a node failure, for tests)
#   --grace  seconds between SIGTERM and SIGKILL [5]
#   --kill   SIGKILL at once (an abrupt crash rather than a shutdown)
#
# Why not `ray stop`: it matches processes by name and stops every Ray process on the machine,
# other clusters and other users' `ray.init()` sessions included. Instead a node's processes are
#   - its process group (start.sh runs each `ray start` under setsid and records the group),
#     used only while some member still names the node's temp dir;
#   - any process whose command line or open files point into the node's temp dir (orphaned
#     workers whose raylet is gone still hold their log files there);
#   - every descendant of those (Ray workers put themselves in groups of their own).
# The node temp dirs (logs) are kept; delete DIR to clean up.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
DIR="${TMARS_CLUSTER_DIR:-$repo/build/ray-local}"
NODE=""; GRACE=5; FORCE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dir) DIR="$2"; shift 2 ;;
        --node) NODE="$2"; shift 2 ;;
        --grace) GRACE="$2"; shift 2 ;;
        --kill) FORCE=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "stop.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ -d "$DIR" ]] || { echo "stop.sh: no cluster dir $DIR" >&2; exit 0; }
DIR="$(cd "$DIR" && pwd)"
nodes="$DIR/nodes"
[[ -s "$nodes" ]] || { echo "stop.sh: nothing recorded in $nodes" >&2; exit 0; }

names_tmp() {  # prints the NAME TMP pairs to stop: workers first, the head last
    if [[ -n "$NODE" ]]; then awk -v n="$NODE" '$1 == n' "$nodes"; else tac "$nodes"; fi
}

points_into() {  # pid pattern: true when the process's argv or open files mention the pattern
    { tr '\0' ' ' < "/proc/$1/cmdline"; echo; ls -l "/proc/$1/fd"; } 2>/dev/null | grep -qF -- "$2"
}

scan() {  # patterns (one a line): pids of all processes whose argv or open files mention one
    local pats="$1"
    grep -lsaF -- "$pats" /proc/[0-9]*/cmdline | cut -d/ -f3
    ls -l /proc/[0-9]*/fd 2>/dev/null | awk -v pats="$pats" '
        BEGIN { n = split(pats, pat, "\n") }
        /^\/proc\/[0-9]+\/fd:$/ { split($0, f, "/"); pid = f[3]; next }
        { for (i = 1; i <= n; i++) if (index($0, pat[i])) { print pid; break } }'
}

# Never this script or its callers: a driver connected to the cluster (say, a test process that
# called ray.init(address=...)) keeps log files in the head's temp dir too.
protect=" $$ "; p=$$
while [[ "$p" -gt 1 ]]; do p="$(ps -o ppid= -p "$p" | tr -d ' ')"; protect+="$p "; done

collect() {  # prints every pid belonging to the selected nodes
    local name pgid raylet tmp p group pids=() dirs=""
    while read -r name pgid raylet tmp; do
        [[ -n "$tmp" ]] || continue
        dirs+="$tmp/"$'\n'
        group="$(ps -eo pid=,pgid= | awk -v g="$pgid" '$2 == g { print $1 }')"
        for p in $group; do
            if points_into "$p" "$tmp/"; then
                for p in $group; do [[ "$protect" == *" $p "* ]] || pids+=("$p"); done
                break
            fi
        done
    done < <(names_tmp)
    [[ -n "$dirs" ]] || return 0
    dirs="${dirs%$'\n'}"
    while read -r p; do
        [[ "$protect" == *" $p "* ]] || pids+=("$p")
    done < <(scan "$dirs" | sort -u)
    (( ${#pids[@]} )) || return 0
    # close over children: Ray workers are the raylet's children but not in its group
    ps -eo pid=,ppid= | awk -v seed="${pids[*]}" '
        BEGIN { n = split(seed, s, " "); for (i = 1; i <= n; i++) keep[s[i]] = 1 }
        { parent[$1] = $2 }
        END {
            do { grew = 0
                 for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grew = 1 }
            } while (grew)
            for (p in keep) print p
        }' | sort -un | while read -r p; do [[ "$protect" == *" $p "* ]] || echo "$p"; done
}

alive() { local p out=(); for p in "$@"; do kill -0 "$p" 2>/dev/null && out+=("$p"); done; echo "${out[*]:-}"; }

mapfile -t pids < <(collect)
if (( ${#pids[@]} )); then
    if (( FORCE )); then
        kill -KILL "${pids[@]}" 2>/dev/null || true
    else
        kill -TERM "${pids[@]}" 2>/dev/null || true
        # GCS and the autoscaler monitor can take >20 s to honour SIGTERM; do not wait for them.
        for ((t = 0; t < GRACE * 10; t++)); do
            [[ -z "$(alive "${pids[@]}")" ]] && break
            sleep 0.1
        done
        left="$(alive "${pids[@]}")"
        # shellcheck disable=SC2086
        [[ -n "$left" ]] && kill -KILL $left 2>/dev/null || true
    fi
fi
# anything spawned while we were stopping (a worker starting up) goes too
mapfile -t late < <(collect)
(( ${#late[@]} )) && kill -KILL "${late[@]}" 2>/dev/null || true

if [[ -n "$NODE" ]]; then
    awk -v n="$NODE" '$1 != n' "$nodes" > "$nodes.tmp" && mv "$nodes.tmp" "$nodes"
    echo "stopped node $NODE of $DIR (${#pids[@]} processes)"
else
    rm -f "$nodes" "$DIR/cluster.env"
    echo "stopped Ray cluster $DIR (${#pids[@]} processes)"
fi
