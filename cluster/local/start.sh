#!/usr/bin/env bash
# Start a real multi-node Ray cluster on this machine: one head + N worker nodes, each a separate
# `ray start` with its own temp dir, ports, CPU/memory/object-store budget and custom resources.
# Several such clusters (and plain `ray.init()` sessions) can share one machine: nothing here uses
# Ray's defaults for ports, temp dir or auth token.
#
#   cluster/local/start.sh [--dir DIR] [--workers N] [--port-base P] [--help]
#   cluster/local/start.sh --dir DIR --join     # one more worker for the running cluster in DIR
#
# Everything else is set by environment variables (defaults in brackets):
#   TMARS_CLUSTER_DIR  [build/ray-local]  state + node temp dirs; keep it short (unix sockets
#                                          live under it and their paths are limited to 107 bytes)
#   NUM_WORKERS [1]  PORT_BASE [26300]  RAY [.venv/bin/ray, else ray]
#   NODE_IP [Ray's choice: the host's address; `ray start` turns 127.0.0.1 into it anyway]
#   HEAD_CPUS [2]    HEAD_MEMORY [2GiB]   HEAD_OBJECT_STORE [256MiB]    HEAD_RESOURCES [{}]
#   WORKER_CPUS [2]  WORKER_MEMORY [3GiB] WORKER_OBJECT_STORE [256MiB]  WORKER_RESOURCES [{"accel": 1}]
#   WORKER_GPUS [unset: Ray autodetects]   RAY_LOCAL_AUTH [token | disabled]
#   DASHBOARD_HOST [127.0.0.1]  where the dashboard / Jobs API listens. Anything but loopback
#                  needs token auth (refused with RAY_LOCAL_AUTH=disabled) and warns: the token
#                  travels in plaintext over http, so prefer an ssh tunnel to the loopback port.
#
# Auth (Ray >= 2.52 token authentication): every node and client needs RAY_AUTH_MODE=token and
# this cluster's token; cluster.env sets both (RAY_AUTH_TOKEN_PATH, never the token itself).
# RAY_LOCAL_AUTH=disabled leaves the GCS and Ray client ports open to anyone on the network
# (Ray advertises the host's address), so it warns.
#
# Ports (all outside Ray's default worker range 10002-19999 and below the ephemeral range):
#   PORT_BASE+0 GCS, +1 dashboard (DASHBOARD_HOST), +2 Ray client server;
#   node i (head = 0): PORT_BASE+10+10*i .. +5 (node manager, object manager, agents, metrics);
#   node i's worker processes: PORT_BASE+1000+200*i .. +199.
#
# Writes into TMARS_CLUSTER_DIR:
#   cluster.env  sourceable: RAY_ADDRESS (GCS, for ray.init/ray status), RAY_API_SERVER_ADDRESS
#                (dashboard, for ray job submit), the auth settings, DASHBOARD_URL
#   nodes        one line per node: NAME PGID RAYLET_PID TEMP_DIR (stop.sh uses it)
#   auth_token   this cluster's token (token auth: a stale ~/.ray/auth_token cannot interfere)
#
# Clients use the cluster with:  source DIR/cluster.env && ray job submit --working-dir . -- ...
# Stop it with cluster/local/stop.sh (never plain `ray stop`: it kills every Ray on the machine).
set -Eeuo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

JOIN=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dir) TMARS_CLUSTER_DIR="$2"; shift 2 ;;
        --workers) NUM_WORKERS="$2"; shift 2 ;;
        --port-base) PORT_BASE="$2"; shift 2 ;;
        --join) JOIN=1; shift ;;  # add one more worker to the running cluster in --dir
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "start.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

GiB=$((1024 * 1024 * 1024)); MiB=$((1024 * 1024))
DIR="${TMARS_CLUSTER_DIR:-$repo/build/ray-local}"
NUM_WORKERS="${NUM_WORKERS:-1}"
PORT_BASE="${PORT_BASE:-26300}"
NODE_IP="${NODE_IP:-}"
HEAD_CPUS="${HEAD_CPUS:-2}"
HEAD_MEMORY="${HEAD_MEMORY:-$((2 * GiB))}"
HEAD_OBJECT_STORE="${HEAD_OBJECT_STORE:-$((256 * MiB))}"
HEAD_RESOURCES="${HEAD_RESOURCES:-{\}}"
WORKER_CPUS="${WORKER_CPUS:-2}"
WORKER_MEMORY="${WORKER_MEMORY:-$((3 * GiB))}"
WORKER_OBJECT_STORE="${WORKER_OBJECT_STORE:-$((256 * MiB))}"
WORKER_RESOURCES="${WORKER_RESOURCES:-{\"accel\": 1\}}"
RAY_LOCAL_AUTH="${RAY_LOCAL_AUTH:-token}"
DASHBOARD_HOST="${DASHBOARD_HOST:-127.0.0.1}"

# Refuse an open Jobs API before anything starts: whoever reaches it runs code on every node.
case "$RAY_LOCAL_AUTH" in
    token|disabled) ;;
    *) echo "start.sh: RAY_LOCAL_AUTH must be 'token' or 'disabled', not '$RAY_LOCAL_AUTH'" >&2; exit 2 ;;
esac
case "$DASHBOARD_HOST" in
    127.*|localhost|::1) dash_loopback=1 ;;
    *) dash_loopback=0 ;;
esac
if (( ! JOIN )); then
    if (( ! dash_loopback )) && [[ "$RAY_LOCAL_AUTH" != token ]]; then
        echo "start.sh: refusing DASHBOARD_HOST=$DASHBOARD_HOST with RAY_LOCAL_AUTH=$RAY_LOCAL_AUTH:" \
             "anyone who reaches it could submit jobs; keep the dashboard on 127.0.0.1 or use token auth" >&2
        exit 2
    fi
    if (( ! dash_loopback )); then
        echo "start.sh: warning: dashboard on $DASHBOARD_HOST (not loopback): token auth is on, but the" \
             "token travels in plaintext over http; prefer 127.0.0.1 and an ssh tunnel" >&2
    fi
    if [[ "$RAY_LOCAL_AUTH" == disabled ]]; then
        echo "start.sh: warning: RAY_LOCAL_AUTH=disabled: the GCS and Ray client ports accept anyone" \
             "on the network without authentication" >&2
    fi
fi
# What clients on this machine connect to (all interfaces include loopback).
case "$DASHBOARD_HOST" in
    0.0.0.0|::) dash_client_host=127.0.0.1 ;;
    *:*) dash_client_host="[$DASHBOARD_HOST]" ;;  # IPv6 in a URL
    *) dash_client_host="$DASHBOARD_HOST" ;;
esac

if [[ -z "${RAY:-}" ]]; then
    if [[ -x "$repo/.venv/bin/ray" ]]; then RAY="$repo/.venv/bin/ray"; else RAY=ray; fi
fi
# Nodes inherit this environment: `python` in a job entrypoint must be the one Ray runs on.
RAY="$(command -v "$RAY")"
export PATH="$(dirname "$RAY"):$PATH"

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
# Ray puts sockets at DIR/<node>/session_<date>_<pid>/sockets/plasma_store (~66 bytes + DIR).
if (( ${#DIR} > 40 )); then
    echo "start.sh: cluster dir '$DIR' is too long for Ray's unix sockets (max 40 chars)" >&2
    exit 2
fi

export RAY_USAGE_STATS_ENABLED=0
# Auth: our own token file, set explicitly. With RAY_AUTH_MODE unset Ray picks up
# ~/.ray/auth_token (written by any earlier ray.init) and nodes then disagree (InvalidAuthToken).
unset RAY_AUTH_TOKEN RAY_AUTH_TOKEN_PATH RAY_ADDRESS RAY_API_SERVER_ADDRESS
if (( JOIN )); then
    [[ -s "$DIR/nodes" && -f "$DIR/cluster.env" ]] || { echo "start.sh: no cluster in $DIR" >&2; exit 1; }
    # shellcheck disable=SC1091
    source "$DIR/cluster.env"  # the running cluster's address, auth settings and PORT_BASE
elif [[ "$RAY_LOCAL_AUTH" == token ]]; then
    if [[ ! -s "$DIR/auth_token" ]]; then
        (umask 077; od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$DIR/auth_token")
    fi
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
else
    export RAY_AUTH_MODE=disabled
fi

gcs=""  # the head's address as Ray advertises it; read back after the head starts
dash_port=$((PORT_BASE + 1))

port_free() {  # true when nothing listens on TCP port $1
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Ports shared by node i's `ray start`. Worker processes get a range of their own so two nodes
# never hand out the same port.
node_ports() {
    local i=$1 p=$((PORT_BASE + 10 + 10 * $1)) w=$((PORT_BASE + 1000 + 200 * $1))
    echo "--node-manager-port=$p --object-manager-port=$((p + 1))" \
         "--dashboard-agent-listen-port=$((p + 2)) --dashboard-agent-grpc-port=$((p + 3))" \
         "--runtime-env-agent-port=$((p + 4)) --metrics-export-port=$((p + 5))" \
         "--min-worker-port=$w --max-worker-port=$((w + 199))"
}

# `setsid` gives each node its own process group: every daemon `ray start` leaves behind
# (gcs, raylet, dashboard, agents) keeps that group, so stop.sh can find exactly this node.
# Ray worker processes make their own groups; stop.sh follows them as the raylet's children.
start_node() {  # name index args...
    local name=$1 i=$2; shift 2
    local tmp="$DIR/$name"
    mkdir -p "$tmp"
    # shellcheck disable=SC2046
    if [[ -n "$NODE_IP" ]]; then set -- --node-ip-address="$NODE_IP" "$@"; fi
    if ! setsid "$RAY" start --temp-dir="$tmp" --disable-usage-stats --log-style=record $(node_ports "$i") "$@" \
            > "$DIR/$name.start.log" 2>&1; then
        echo "start.sh: ray start failed for $name; last lines of $DIR/$name.start.log:" >&2
        tail -20 "$DIR/$name.start.log" >&2
        return 1
    fi
    local raylet pgid
    raylet="$(pgrep -f -- "--raylet_socket_name=$tmp/" | head -1 || true)"
    if [[ -z "$raylet" ]]; then echo "start.sh: no raylet found for $name" >&2; return 1; fi
    pgid="$(ps -o pgid= -p "$raylet" | tr -d ' ')"
    echo "$name $pgid $raylet $tmp" >> "$DIR/nodes"
}

start_worker() {  # index
    local i=$1
    if (( i > 98 )); then echo "start.sh: at most 98 workers (port layout)" >&2; return 1; fi
    local args=(--address="$gcs" --num-cpus="$WORKER_CPUS" --memory="$WORKER_MEMORY"
                --object-store-memory="$WORKER_OBJECT_STORE" --resources="$WORKER_RESOURCES")
    if [[ -n "${WORKER_GPUS:-}" ]]; then args+=(--num-gpus="$WORKER_GPUS"); fi
    start_node "w$i" "$i" "${args[@]}"
}

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
secs() { printf "%d.%d" $(( $1 / 1000 )) $(( $1 % 1000 / 100 )); }  # ms -> "s.d"

t0=$(now_ms)
if (( JOIN )); then
    gcs="$RAY_ADDRESS"
    i=1  # first worker index not in use (a removed worker's index is free again)
    while grep -q "^w$i " "$DIR/nodes"; do i=$((i + 1)); done
    start_worker "$i"
    echo "joined w$i to $gcs in $(secs $(( $(now_ms) - t0 ))) s"
    exit 0
fi

if [[ -s "$DIR/nodes" ]]; then
    echo "start.sh: $DIR already has a cluster (nodes file); run stop.sh --dir $DIR first" >&2
    exit 1
fi
for p in "$PORT_BASE" "$dash_port" $((PORT_BASE + 2)); do
    port_free "$p" || { echo "start.sh: port $p is in use; pick another --port-base" >&2; exit 1; }
done
: > "$DIR/nodes"

# Undo a half-started cluster so a failed start never leaves daemons behind.
trap 'echo "start.sh: start failed, stopping what was started" >&2; "$here/stop.sh" --dir "$DIR" >&2 || true' ERR

start_node head 0 --head --port="$PORT_BASE" \
    --dashboard-host="$DASHBOARD_HOST" --dashboard-port="$dash_port" --include-dashboard=true \
    --ray-client-server-port=$((PORT_BASE + 2)) \
    --num-cpus="$HEAD_CPUS" --memory="$HEAD_MEMORY" --object-store-memory="$HEAD_OBJECT_STORE" \
    --resources="$HEAD_RESOURCES"
t_head=$(now_ms)
gcs="$(cat "$DIR/head/ray_current_cluster")"

for ((i = 1; i <= NUM_WORKERS; i++)); do start_worker "$i"; done
trap - ERR

{
    echo "# Ray cluster started by cluster/local/start.sh; use: source $DIR/cluster.env"
    echo "export RAY_ADDRESS=$gcs"
    echo "export RAY_API_SERVER_ADDRESS=http://$dash_client_host:$dash_port"
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    if [[ "$RAY_AUTH_MODE" == token ]]; then echo "export RAY_AUTH_TOKEN_PATH=$DIR/auth_token"; fi
    echo "DASHBOARD_URL=http://$dash_client_host:$dash_port"
    echo "TMARS_CLUSTER_DIR=$DIR"
    echo "PORT_BASE=$PORT_BASE"
} > "$DIR/cluster.env"

echo "Ray cluster up: head + $NUM_WORKERS worker(s) in $(secs $(( $(now_ms) - t0 ))) s" \
     "(head $(secs $(( t_head - t0 ))) s)"
echo "  GCS        $gcs"
echo "  dashboard  http://$dash_client_host:$dash_port (bound to $DASHBOARD_HOST)"
echo "  use it     source $DIR/cluster.env"
echo "  stop it    $here/stop.sh --dir $DIR"
