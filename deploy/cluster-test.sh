#!/usr/bin/env bash
# Failover test against a RabbitMQ cluster: starts a 3-node RabbitMQ cluster of its own on this
# machine, runs tollgate on it (the front, `tollgate serve`, and the worker, `tollgate worker`, as
# separate processes, both given all three nodes in AMQP_URL), puts a steady submit load on the
# front, hard-stops the node that leads the jobs queue `tollgate.jobs` in the middle of it, and
# brings that node back. Then it waits for every admitted job to end and checks, in SQL, that
# every one completed exactly once and that the ledger balances.
#
#   bash deploy/cluster-test.sh
#
# It prints a summary at the end and exits 0 only if no admitted job was lost, none completed,
# ended or was charged more than once, the ledger balances, and tollgate went on by itself on the
# surviving nodes while the stopped one was down: the front had RabbitMQ confirm jobs admitted
# after the stop, and the worker started some of them, before the node came back. It exits 1
# otherwise (after printing the nodes' and tollgate's logs), 2 if the set-up failed. It takes
# about 2 minutes after the build (`cargo build --release --locked --bin tollgate`, run first).
# It is not part of `cargo test`.
#
# The cluster: three nodes started one by one, nodes 2 and 3 joined to node 1 with
# `rabbitmqctl join_cluster`; tollgate declares its queues once the cluster is formed, so its
# quorum queues get a member on every node (checked, and shown with `rabbitmq-queues
# quorum_status`). The leader is looked up with `rabbitmqctl list_queues name leader` just
# before the stop.
#
# What it leaves alone: the machine's own RabbitMQ (rabbit@localhost, port 5672) and PostgreSQL
# keep running untouched. The three nodes are tg-cluster-{1,2,3}@localhost with AMQP on
# 127.0.0.1:5701-5703 and Erlang distribution on 25701-25703 (CLUSTER_PORT and DIST_PORT move
# them), their own config, plugins file (no plugins), data and log directories in a temporary
# directory, and an Erlang cookie of their own there (so no command of this script can reach
# another node). epmd (4369) is shared. tollgate uses its own database, tollgate_cluster_test
# (dropped first if an earlier run left it). On exit — success, failure or Ctrl-C — the nodes are
# stopped, the tollgate processes it started are stopped, the database is dropped and the
# temporary directory is removed (its logs are kept, and their path printed, when the test fails;
# KEEP_WORK=1 keeps it always).
#
# The stop is `kill -9` of the leader node's Erlang VM (STOP_MODE=kill, the default: like a lost
# host, nothing is closed cleanly); STOP_MODE=stop uses `rabbitmqctl stop` instead.
#
# How it measures (timestamps are the machine's clock; PostgreSQL runs on the same machine):
# - the load generator, deploy/cluster-load.py, records every request: when it was sent, its
#   HTTP status and the job id it got; this is loaded into the database beside the jobs;
# - a trigger of this test on tollgate.jobs (schema cluster_test, created after tollgate's
#   migrations) records every status change and new attempt of every job in the transaction
#   that makes it, so "completed more than once" and "charged more than once" are counted from
#   what was committed;
# - connections are listed with `rabbitmqctl list_connections` and told apart by their name and
#   by the process (front or worker) that owns their client port (`ss`), polled while the node
#   is down;
# - "publishing resumed": tollgate.outbox.sent_at is set once RabbitMQ confirmed a job's
#   message; the longest wait from admission (jobs.created_at) to that confirm, among the jobs
#   admitted after the stop, is how long publishing was held up by the stop. The same for the
#   start of the first attempt (jobs.started_at) says how long consuming was held up;
# - nacks: the lines of tollgate's logs that report a publish RabbitMQ nacked, and those that
#   report a publishing channel replaced after one (queue::ConfirmChannel).
#
# Settings (environment): RATE (submits/s, 30), LOAD_SECONDS (60), STOP_AT (20) and START_AT (40)
# seconds into the load, CLIENTS (8), DRAIN_TIMEOUT (120 s for every job to end after the load),
# MOCK_DELAY_MS (25: mock-1's 20 pieces take about 0.5 s), STOP_MODE (kill|stop), STOP_NODE
# (leader, the default, or 1, 2 or 3 to stop that node whatever it holds), AMQP_URLS (the nodes
# tollgate is given, in order: 1,2,3; e.g. 1 for node 1 only), PG (the PostgreSQL server,
# postgres://postgres@127.0.0.1:5432), SKIP_BUILD=1, KEEP_WORK=1.
set -euo pipefail

RATE=${RATE:-30}
LOAD_SECONDS=${LOAD_SECONDS:-60}
STOP_AT=${STOP_AT:-20}
START_AT=${START_AT:-40}
CLIENTS=${CLIENTS:-8}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-120}
MOCK_DELAY_MS=${MOCK_DELAY_MS:-25}
STOP_MODE=${STOP_MODE:-kill}
STOP_NODE=${STOP_NODE:-leader}
AMQP_URLS=${AMQP_URLS:-1,2,3}
CLUSTER_PORT=${CLUSTER_PORT:-5701}
DIST_PORT=${DIST_PORT:-25701}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
DB_NAME=tollgate_cluster_test
DATABASE_URL="$PG/$DB_NAME"
QUEUE=tollgate.jobs
RABBIT_BIN=/usr/lib/rabbitmq/bin   # the tools themselves, not /usr/sbin's wrappers (they su to rabbitmq)
NODES=(1 2 3)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOLLGATE="$ROOT/target/release/tollgate"
T0=$SECONDS

log() { printf '[%4ds] %s\n' $((SECONDS - T0)) "$*" >&2; }
die() { log "error: $*"; exit 2; }
now() { date +%s.%N; }

node_name() { echo "tg-cluster-$1@localhost"; }
node_port() { echo $((CLUSTER_PORT + $1 - 1)); }
node_dir() { echo "$WORK/node$1"; }
node_log() { echo "$(node_dir "$1")/log/$(node_name "$1").log"; }

# ---------------------------------------------------------------------------------------------
# Clean-up: everything this script started, and only that
# ---------------------------------------------------------------------------------------------

WORK=""
TEST_FAILED=0
FRONT_PID=""
WORKER_PID=""
LOAD_PID=""
DB_CREATED=0

stop_process() {  # stop_process PID NAME: SIGTERM, 15 s, then SIGKILL
    local pid=$1 name=$2 i
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 150); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    log "$name (pid $pid) did not stop in 15 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

node_pid() {  # the OS pid of node $1's Erlang VM, if it runs
    local file pid
    file="$(node_dir "$1")/pid"
    [ -f "$file" ] || return 1
    pid=$(cat "$file")
    [ -n "$pid" ] && tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null \
        | grep -qx "RABBITMQ_NODENAME=$(node_name "$1")" && echo "$pid"
}

node_processes() {  # every process started for node $1 (they carry its pid file's path)
    grep -lsxF "RABBITMQ_PID_FILE=$(node_dir "$1")/pid" --null-data /proc/[0-9]*/environ 2>/dev/null \
        | sed -E 's|^/proc/([0-9]+)/environ$|\1|' || true
}

stop_node() {  # stop_node I: rabbitmqctl stop, then kill -9 whatever of it still runs
    local left
    [ -n "$(node_processes "$1")" ] || return 0
    timeout 30 "$RABBIT_BIN/rabbitmqctl" -n "$(node_name "$1")" -q stop >/dev/null 2>&1 || true
    for _ in $(seq 1 50); do
        left=$(node_processes "$1")
        [ -n "$left" ] || return 0
        sleep 0.2
    done
    kill -KILL $left 2>/dev/null || true
}

print_logs() {
    local i f
    [ -n "$WORK" ] && [ -d "$WORK" ] || return 0
    for i in "${NODES[@]}"; do
        f=$(node_log "$i")
        [ -f "$f" ] || continue
        echo "----- $(node_name "$i"): last warnings and errors in $f" >&2
        grep -E '\[(warning|error)\]' "$f" | tail -n 12 | cut -c1-300 >&2 || true
    done
    for f in "$WORK/serve.log" "$WORK/worker.log"; do
        [ -f "$f" ] || continue
        echo "----- $(basename "$f" .log): warnings and errors in $f, by count (job ids and times left out)" >&2
        grep -E ' (WARN|ERROR) ' "$f" | sed -E 's/^[^ ]+ +//; s/(job_id|id)=[^ ]+/\1=…/g; s/retry_in=[^ ]+/retry_in=…/' \
            | sort | uniq -c | sort -rn | head -n 20 | cut -c1-400 >&2 || true
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    [ -n "$LOAD_PID" ] && kill "$LOAD_PID" 2>/dev/null
    if [ "$rc" -ne 0 ] && [ "$TEST_FAILED" -eq 0 ]; then
        log "failed (exit $rc); logs follow"
        print_logs
    fi
    log "cleaning up"
    stop_process "$FRONT_PID" "tollgate serve"
    stop_process "$WORKER_PID" "tollgate worker"
    if [ -n "$WORK" ]; then
        export HOME="$WORK"  # the cookie the nodes and the CLI share
        for i in "${NODES[@]}"; do stop_node "$i" & done
        wait
    fi
    if [ "$DB_CREATED" -eq 1 ]; then
        psql "$PG/postgres" -qAtc "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)" >/dev/null \
            || log "could not drop database $DB_NAME"
    fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "${KEEP_WORK:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
            for i in "${NODES[@]}"; do rm -rf "$(node_dir "$i")/mnesia"; done
            log "logs kept in $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    log "done in $((SECONDS - T0)) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Preflight
# ---------------------------------------------------------------------------------------------

for tool in rabbitmq-server rabbitmqctl rabbitmq-queues rabbitmq-diagnostics; do
    [ -x "$RABBIT_BIN/$tool" ] || die "$RABBIT_BIN/$tool not found (is RabbitMQ installed? deploy/services.sh)"
done
for tool in psql curl python3 cargo epmd ss; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
case "$STOP_MODE" in kill | stop) ;; *) die "STOP_MODE must be kill or stop" ;; esac
case "$STOP_NODE" in leader | 1 | 2 | 3) ;; *) die "STOP_NODE must be leader, 1, 2 or 3" ;; esac
[ "$STOP_AT" -lt "$START_AT" ] && [ "$START_AT" -lt "$LOAD_SECONDS" ] \
    || die "need STOP_AT < START_AT < LOAD_SECONDS"

port_free() { ! timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
for i in "${NODES[@]}"; do
    port_free "$(node_port "$i")" || die "port $(node_port "$i") is taken (CLUSTER_PORT moves the nodes)"
    port_free $((DIST_PORT + i - 1)) || die "port $((DIST_PORT + i - 1)) is taken (DIST_PORT moves the nodes)"
    if epmd -names 2>/dev/null | grep -q "^name tg-cluster-$i at"; then
        die "a node tg-cluster-$i is registered in epmd already (an earlier run still going?)"
    fi
done
pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || psql "$PG/postgres" -qAtc 'SELECT 1' >/dev/null \
    || die "PostgreSQL does not answer at $PG"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "building: cargo build --release --locked --bin tollgate"
    (cd "$ROOT" && cargo build --release --locked --bin tollgate) >&2 || die "the build failed"
fi
[ -x "$TOLLGATE" ] || die "$TOLLGATE not found"
TEST_T0=$SECONDS

WORK=$(mktemp -d /tmp/tollgate-cluster.XXXXXX)
export HOME="$WORK"   # the RabbitMQ CLI and the nodes find the cookie in $HOME/.erlang.cookie
head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32 >"$WORK/.erlang.cookie"
chmod 400 "$WORK/.erlang.cookie"
: >"$WORK/enabled_plugins"
: >"$WORK/rabbitmq-env.conf"   # instead of /etc/rabbitmq/rabbitmq-env.conf (the machine's node)
export RABBITMQ_CONF_ENV_FILE="$WORK/rabbitmq-env.conf"
export ERL_EPMD_ADDRESS=127.0.0.1

rmq() { timeout 60 "$RABBIT_BIN/$1" "${@:2}"; }                  # rmq TOOL ARGS...
ctl() { local n=$1; shift; rmq rabbitmqctl -n "$(node_name "$n")" -q "$@"; }   # ctl I ARGS...

# ---------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------

start_node() {  # start_node I: starts node I (detached); its first start also writes its config
    local i=$1 dir
    dir=$(node_dir "$i")
    mkdir -p "$dir/mnesia" "$dir/log"
    [ -f "$dir/rabbitmq.conf" ] || cat >"$dir/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$(node_port "$i")
loopback_users.guest = true
log.file.level = info
log.console = false
EOF
    [ -f "$dir/advanced.config" ] || echo '[].' >"$dir/advanced.config"
    (
        export RABBITMQ_NODENAME="$(node_name "$i")"
        export RABBITMQ_DIST_PORT=$((DIST_PORT + i - 1))
        export RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
        export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
        export RABBITMQ_ENABLED_PLUGINS_FILE="$WORK/enabled_plugins"
        export RABBITMQ_MNESIA_BASE="$dir/mnesia"
        export RABBITMQ_LOG_BASE="$dir/log"
        export RABBITMQ_PID_FILE="$dir/pid"
        export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
        cd "$dir"
        "$RABBIT_BIN/rabbitmq-server" -detached >>"$dir/log/server-stdout.log" 2>&1
    ) || die "rabbitmq-server for $(node_name "$i") did not start"
}

await_node() {  # await_node I SECONDS: waits until node I runs RabbitMQ and its AMQP port answers
    local i=$1 limit=$2 deadline=$((SECONDS + $2))
    # The AMQP port opens at the end of the boot; only then ask the node itself (each CLI call
    # starts an Erlang VM of its own, seconds on a busy machine).
    until ! port_free "$(node_port "$i")" && ctl "$i" await_startup --timeout 30 >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "$(node_name "$i") did not start within ${limit}s (log: $(node_log "$i"))"
        sleep 1
    done
}

running_nodes() {  # running_nodes I: the cluster's running nodes as node I sees them, one a line
    ctl "$1" cluster_status --formatter json 2>/dev/null \
        | python3 -c '
import json, sys
text = sys.stdin.read().strip()
print("\n".join(sorted(json.loads(text).get("running_nodes", []) if text else [])))'
}

# queue_info I FIELD: the jobs queue's leader, members or online members as node I sees them.
queue_info() {
    ctl "$1" list_queues name type leader members online --formatter json --timeout 15 2>/dev/null \
        | python3 -c '
import json, sys
field, queue = sys.argv[1], sys.argv[2]
text = sys.stdin.read().strip()
for q in (json.loads(text) if text else []):
    if q["name"] == queue:
        value = q.get(field)
        print(" ".join(sorted(value)) if isinstance(value, list) else value)
' "$2" "$QUEUE"
}

node_index() { sed -E 's/^tg-cluster-([0-9]+)@.*/\1/' <<<"$1"; }

# connections I: the cluster's client connections as node I sees them, one a line:
# "process/name node", the process (front, worker or other) found by the connection's client port
# (ss), the name without "tollgate-", the node by the port the client connected to.
connections() {
    local sockets
    sockets=$(ss -Htnp state established "( dport >= :$(node_port 1) and dport <= :$(node_port 3) )" 2>/dev/null || true)
    ctl "$1" list_connections client_properties port peer_port --formatter json --timeout 15 2>/dev/null \
        | python3 -c '
import json, re, sys
base, front, worker, sockets = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
owner = {}
for line in sockets.splitlines():
    m = re.search(r":(\d+)\s+\S+:\d+\s+users:.*pid=(\d+)", line)
    if m:
        owner[int(m.group(1))] = {front: "front", worker: "worker"}.get(m.group(2), "other")
text = sys.stdin.read().strip()
for c in (json.loads(text) if text else []):
    props = c.get("client_properties") or []
    if isinstance(props, dict):
        name = props.get("connection_name", "?")
    else:
        name = next((p[2] for p in props if p[0] == "connection_name"), "?")
    name = name[len("tollgate-"):] if name.startswith("tollgate-") else name
    print("%s/%s tg-cluster-%d@localhost" % (owner.get(c.get("peer_port"), "other"), name, c["port"] - base + 1))
' "$CLUSTER_PORT" "${FRONT_PID:-0}" "${WORKER_PID:-0}" "$sockets" | sort
}

# queue_layout: each queue's type and where it lives: one line per quorum group size, and one per
# node holding classic queues (which live on that one node: `list_queues --local` on each).
queue_layout() {
    local i
    ctl 1 list_queues name type members --formatter json --timeout 15 >"$WORK/queues.json" 2>/dev/null || true
    for i in "${NODES[@]}"; do
        ctl "$i" list_queues --local name type --formatter json --timeout 15 >"$WORK/queues-$i.json" 2>/dev/null || true
    done
    python3 - "$WORK" "${NODES[@]}" <<'PY'
import json, sys
from collections import defaultdict
work, nodes = sys.argv[1], sys.argv[2:]
def load(path):
    try:
        text = open(path).read().strip()
    except OSError:
        return []
    return json.loads(text) if text else []
groups = defaultdict(list)
for q in load(f"{work}/queues.json"):
    if q.get("type") == "quorum":
        groups["quorum, %d members" % len(q.get("members") or [])].append(q["name"])
for i in nodes:
    for q in load(f"{work}/queues-{i}.json"):
        if q.get("type") != "quorum":
            groups["%s, on tg-cluster-%s@localhost only" % (q.get("type"), i)].append(q["name"])
for group, names in sorted(groups.items()):
    print("%s (%d): %s" % (group, len(names), " ".join(sorted(names))))
PY
}

# quorum_status I: one line per member of the jobs queue, as node I sees them.
quorum_status() {
    rmq rabbitmq-queues -n "$(node_name "$1")" -q quorum_status "$QUEUE" --formatter json 2>/dev/null \
        | python3 -c '
import json, sys
text = sys.stdin.read().strip()
for m in (json.loads(text) if text else []):
    print("    %-24s %-10s log index %-6s commit index %-6s term %s" % (
        m.get("Node Name"), m.get("Raft State"), m.get("Log Index"), m.get("Commit Index"), m.get("Term")))
'
}

log "starting RabbitMQ nodes $(node_name 1), $(node_name 2), $(node_name 3) (AMQP $(node_port 1)-$(node_port 3)) in $WORK"
for i in "${NODES[@]}"; do start_node "$i"; done
for i in "${NODES[@]}"; do await_node "$i" 90; done
for i in 2 3; do
    {
        ctl "$i" stop_app && ctl "$i" join_cluster "$(node_name 1)" && ctl "$i" start_app
    } >>"$WORK/join.log" 2>&1 || die "$(node_name "$i") could not join $(node_name 1): $(tail -n 5 "$WORK/join.log")"
done
for i in "${NODES[@]}"; do await_node "$i" 60; done
members=$(running_nodes 1 | paste -sd' ')
[ "$(wc -w <<<"$members")" -eq 3 ] || die "the cluster runs $members, not three nodes"
log "cluster formed: $members"

# ---------------------------------------------------------------------------------------------
# tollgate
# ---------------------------------------------------------------------------------------------

AMQP_URL=$(for i in ${AMQP_URLS//,/ }; do printf 'amqp://guest:guest@127.0.0.1:%s/%%2f,' "$(node_port "$i")"; done)
AMQP_URL=${AMQP_URL%,}
FRONT_ADDR="127.0.0.1:$(free_port)"
WORKER_ADDR="127.0.0.1:$(free_port)"
cat >"$WORK/tollgate.toml" <<EOF
# tollgate for the cluster test: the defaults, with a mock model whose jobs take about 0.5 s.
[amqp]
connection_name = "tollgate"

[[models]]
name = "mock-1"
provider = "mock"
input_price_per_1m = 1.0
output_price_per_1m = 2.0
max_output_tokens = 4096
mock_deltas = 20
mock_delay_ms = $MOCK_DELAY_MS
EOF
export DATABASE_URL AMQP_URL
export TOLLGATE_CONFIG="$WORK/tollgate.toml"
export TOLLGATE_LISTEN="$FRONT_ADDR"
export TOLLGATE_WORKER_LISTEN="$WORKER_ADDR"
export RUST_LOG=${RUST_LOG:-info}

psql "$PG/postgres" -qAtc "DROP DATABASE IF EXISTS $DB_NAME WITH (FORCE)" >/dev/null
DB_CREATED=1   # from here on, whatever tollgate creates is dropped on exit
log "AMQP_URL=$AMQP_URL"
log "creating the key (migrates $DB_NAME)"
KEY=$("$TOLLGATE" keys create --name cluster --rpm 100000 2>>"$WORK/keys.log" | tail -n 1) \
    || die "tollgate keys create failed: $(tail -n 5 "$WORK/keys.log")"
[[ "$KEY" == sk-tg-* ]] || die "unexpected key output: $KEY"

sql() { psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -qAt "$@"; }

# The test's own record of every transition, written in the transaction that makes it.
sql >/dev/null <<'EOF'
CREATE SCHEMA cluster_test;
CREATE TABLE cluster_test.transitions (
    id          bigserial PRIMARY KEY,
    job_id      uuid NOT NULL,
    old_status  text,
    status      text NOT NULL,
    attempt     integer NOT NULL,
    charged     bigint,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION cluster_test.record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO cluster_test.transitions (job_id, old_status, status, attempt, charged)
    VALUES (NEW.id, CASE WHEN TG_OP = 'UPDATE' THEN OLD.status::text END, NEW.status::text,
            NEW.attempt, NEW.charged_micro_usd);
    RETURN NULL;
END $$;
CREATE TRIGGER zz_cluster_test_insert AFTER INSERT ON tollgate.jobs
    FOR EACH ROW EXECUTE FUNCTION cluster_test.record();
CREATE TRIGGER zz_cluster_test_update AFTER UPDATE OF status, attempt ON tollgate.jobs
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.attempt IS DISTINCT FROM NEW.attempt)
    EXECUTE FUNCTION cluster_test.record();
CREATE TABLE cluster_test.submits (
    seq int, submitted float8, answered float8, status int, job_id uuid, error text
);
CREATE TABLE cluster_test.marks (name text PRIMARY KEY, at timestamptz NOT NULL);
EOF
mark() { sql -c "INSERT INTO cluster_test.marks VALUES ('$1', to_timestamp($2))" >/dev/null; }

log "starting tollgate serve on $FRONT_ADDR and tollgate worker"
"$TOLLGATE" serve >"$WORK/serve.log" 2>&1 &
FRONT_PID=$!
"$TOLLGATE" worker >"$WORK/worker.log" 2>&1 &
WORKER_PID=$!

deadline=$((SECONDS + 60))
until curl -fsS "http://$FRONT_ADDR/readyz" 2>/dev/null | grep -q '"rabbitmq":true'; do
    kill -0 "$FRONT_PID" 2>/dev/null || die "tollgate serve exited: $(tail -n 5 "$WORK/serve.log")"
    [ "$SECONDS" -lt "$deadline" ] || die "the front was not ready within 60 s: $(curl -sS "http://$FRONT_ADDR/readyz" 2>&1)"
    sleep 0.5
done
deadline=$((SECONDS + 60))
until [ "$(ctl 1 list_queues name consumers --no-table-headers 2>/dev/null | awk -v q="$QUEUE" '$1 == q {print $2}')" -ge 1 ] 2>/dev/null; do
    kill -0 "$WORKER_PID" 2>/dev/null || die "tollgate worker exited: $(tail -n 5 "$WORK/worker.log")"
    [ "$SECONDS" -lt "$deadline" ] || die "no worker consumes $QUEUE after 60 s"
    sleep 0.5
done

members=$(queue_info 1 members)
log "$QUEUE: leader $(queue_info 1 leader), members $members"
log "rabbitmq-queues quorum_status $QUEUE:"
quorum_status 1 >&2 || true
[ "$(wc -w <<<"$members")" -eq 3 ] || die "$QUEUE has members '$members', not all three nodes"
log "queues:"
QUEUE_LAYOUT=$(queue_layout || true)
sed 's/^/    /' <<<"$QUEUE_LAYOUT" >&2
log "tollgate's connections (process/connection node):"
connections 1 | sed 's/^/    /' >&2

# ---------------------------------------------------------------------------------------------
# Load, stop, start
# ---------------------------------------------------------------------------------------------

log "load: $RATE submits/s for $LOAD_SECONDS s from $CLIENTS clients; $([ "$STOP_NODE" = leader ] && echo "the leader's node" || echo "node $STOP_NODE") stops at ${STOP_AT}s, starts at ${START_AT}s"
LOAD_START=$(now)
python3 "$ROOT/deploy/cluster-load.py" --url "http://$FRONT_ADDR" --key "$KEY" --rate "$RATE" \
    --seconds "$LOAD_SECONDS" --clients "$CLIENTS" --out "$WORK/submits.csv" &
LOAD_PID=$!
mark load_start "$LOAD_START"

sleep_until() {  # sleep_until SECONDS_INTO_LOAD
    local wait
    wait=$(python3 -c "import time; print(max(0.0, $LOAD_START + $1 - time.time()))")
    sleep "$wait"
}

sleep_until "$STOP_AT"
LEADER=$(queue_info 1 leader)
[ -n "$LEADER" ] && [ "$LEADER" != None ] || die "no leader for $QUEUE"
if [ "$STOP_NODE" = leader ]; then
    VICTIM=$(node_index "$LEADER")
    ROLE="the leader of $QUEUE"
else
    VICTIM=$STOP_NODE
    [ "$(node_name "$VICTIM")" = "$LEADER" ] && ROLE="the leader of $QUEUE" || ROLE="a follower of $QUEUE (leader: $LEADER)"
fi
STOPPED_NODE=$(node_name "$VICTIM")
SURVIVOR=$(for i in "${NODES[@]}"; do [ "$i" = "$VICTIM" ] || echo "$i"; done | head -n 1)
CONNS_BEFORE=$(connections "$SURVIVOR" | paste -sd, | sed 's/,/, /g')
VICTIM_PID=$(node_pid "$VICTIM") || die "no pid for $STOPPED_NODE"
ISSUED=$(now)
if [ "$STOP_MODE" = kill ]; then
    kill -KILL "$VICTIM_PID"
    STOP_HOW="kill -9 of its Erlang VM (pid $VICTIM_PID)"
else
    ctl "$VICTIM" stop >/dev/null || true
    STOP_HOW="rabbitmqctl stop"
fi
# "The stop" from here on is the moment the node's VM is gone: a graceful stop serves on for a
# while after it was asked to stop.
vm_running() {  # vm_running PID: the process exists and is not a zombie waiting to be reaped
    [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ] && [ -e "/proc/$1" ]
}
deadline=$((SECONDS + 60))
while vm_running "$VICTIM_PID"; do
    [ "$SECONDS" -lt "$deadline" ] || die "$STOPPED_NODE (pid $VICTIM_PID) still runs 60 s after: $STOP_HOW"
    sleep 0.05
done
STOPPED=$(now)
STOP_HOW="$STOP_HOW; gone $(python3 -c "print(f'{$STOPPED - $ISSUED:.2f}')") s later"
mark stopped "$STOPPED"
log "stopped $STOPPED_NODE, $ROLE: $STOP_HOW"
log "tollgate's connections before the stop: $CONNS_BEFORE"

# Until shortly before the restart: who leads the queue now, and when each tollgate connection
# shows up again on a surviving node (the survivors list only their own connections now).
elapsed() { python3 -c "print(f'{$(now) - $STOPPED:.1f}')"; }
before_restart() { python3 -c "import sys, time; sys.exit(0 if time.time() < $LOAD_START + $START_AT - 1 else 1)"; }
NEW_LEADER=""
ELECTED=""
declare -A BACK=()
ROLES=(front/publisher worker/worker worker/webhooks worker/publisher)
while before_restart; do
    if [ -z "$NEW_LEADER" ]; then
        leader=$(queue_info "$SURVIVOR" leader || true)
        if [ -n "$leader" ] && [ "$leader" != None ] && [ "$leader" != "$STOPPED_NODE" ]; then
            NEW_LEADER=$leader
            ELECTED=$(elapsed)
            log "leader of $QUEUE: $NEW_LEADER (seen $ELECTED s after the stop)"
        fi
    fi
    conns=$(connections "$SURVIVOR" || true)
    for role in "${ROLES[@]}"; do
        [ -z "${BACK[$role]:-}" ] || continue
        on=$(awk -v n="$role" '$1 == n {print $2; exit}' <<<"$conns")
        if [ -n "$on" ]; then
            e=$(elapsed)
            BACK[$role]="$e s after the stop, on $on"
            log "$role has a connection on $on ($e s after the stop)"
        fi
    done
    sleep 0.5
done
CONNS_DURING=$(connections "$SURVIVOR" | paste -sd, | sed 's/,/, /g')
log "tollgate's connections just before $STOPPED_NODE starts again: ${CONNS_DURING:-none}"

sleep_until "$START_AT"
RESTARTED=$(now)
mark restarted "$RESTARTED"
log "starting $STOPPED_NODE again"
start_node "$VICTIM"
await_node "$VICTIM" 90
REJOINED=""
deadline=$((SECONDS + 90))
while [ "$SECONDS" -lt "$deadline" ]; do
    if [ "$(running_nodes "$VICTIM" | wc -l)" -eq 3 ] \
        && grep -qw -- "$STOPPED_NODE" <<<"$(queue_info "$SURVIVOR" online)"; then
        REJOINED=$(python3 -c "print(f'{$(now) - $RESTARTED:.1f}')")
        break
    fi
    sleep 0.5
done
[ -n "$REJOINED" ] || die "$STOPPED_NODE did not rejoin the cluster and $QUEUE within 90 s"
log "$STOPPED_NODE is back in the cluster and online in $QUEUE, ${REJOINED} s after its start"

wait "$LOAD_PID" || die "the load generator failed"
LOAD_PID=""
LOAD_END=$(now)
mark load_end "$LOAD_END"

# ---------------------------------------------------------------------------------------------
# Drain and check
# ---------------------------------------------------------------------------------------------

sql -c "\\copy cluster_test.submits FROM '$WORK/submits.csv' WITH (FORMAT csv, HEADER true)"
log "waiting (at most $DRAIN_TIMEOUT s) for every job to end"
DRAINED=0
deadline=$((SECONDS + DRAIN_TIMEOUT))
while :; do
    open=$(sql -c "SELECT count(*) FROM tollgate.jobs WHERE status IN ('queued', 'in_progress')")
    if [ "$open" -eq 0 ]; then DRAINED=1; break; fi
    [ "$SECONDS" -lt "$deadline" ] || break
    sleep 1
done
DRAIN_SECONDS=$(python3 -c "print(f'{$(now) - $LOAD_END:.1f}')")
[ "$DRAINED" = 1 ] || log "jobs still open after $DRAIN_TIMEOUT s: $open"
CONNS_AFTER=$(connections "$SURVIVOR" | paste -sd, | sed 's/,/, /g')
QUORUM_AFTER=$(quorum_status "$SURVIVOR" || true)
kill -0 "$FRONT_PID" 2>/dev/null && FRONT_ALIVE=yes || FRONT_ALIVE=no
kill -0 "$WORKER_PID" 2>/dev/null && WORKER_ALIVE=yes || WORKER_ALIVE=no

# Every figure of the summary, as name|value lines.
sql >"$WORK/figures" <<'EOF'
WITH m AS (SELECT (SELECT at FROM cluster_test.marks WHERE name = 'stopped') AS stopped,
                  (SELECT at FROM cluster_test.marks WHERE name = 'restarted') AS restarted),
     answered AS (SELECT * FROM cluster_test.submits WHERE status BETWEEN 200 AND 299),
     everyone AS (SELECT job_id FROM answered UNION SELECT id FROM tollgate.jobs),
     first_outbox AS (SELECT DISTINCT ON (job_id) job_id, sent_at FROM tollgate.outbox ORDER BY job_id, id),
     t AS (SELECT job_id,
                  count(*) FILTER (WHERE status = 'completed') AS completions,
                  count(*) FILTER (WHERE status IN ('completed', 'failed', 'cancelled', 'incomplete')) AS endings,
                  count(*) FILTER (WHERE status IN ('completed', 'failed', 'cancelled', 'incomplete') AND charged > 0) AS charges,
                  count(*) FILTER (WHERE status = 'in_progress') AS starts
             FROM cluster_test.transitions GROUP BY job_id),
     after_stop AS (SELECT j.*, o.sent_at FROM tollgate.jobs j JOIN first_outbox o ON o.job_id = j.id, m
                     WHERE j.created_at >= m.stopped),
     counters AS (SELECT coalesce(sum(in_flight), 0) AS in_flight, coalesce(sum(reserved_micro_usd), 0) AS reserved,
                         coalesce(sum(spent_micro_usd), 0) AS spent FROM tollgate.key_counters)
SELECT 'submitted|' || count(*) FROM cluster_test.submits
UNION ALL SELECT 'admitted|' || count(*) FROM answered
UNION ALL SELECT 'refused|' || count(*) FROM cluster_test.submits WHERE status NOT BETWEEN 200 AND 299
UNION ALL SELECT 'refused_detail|' || coalesce(string_agg(n || ' x ' || status || ' ' || coalesce(error, ''), '; '), '')
            FROM (SELECT status, error, count(*) AS n FROM cluster_test.submits
                   WHERE status NOT BETWEEN 200 AND 299 GROUP BY 1, 2) r
UNION ALL SELECT 'no_answer|' || count(*) FROM cluster_test.submits WHERE status IS NULL
UNION ALL SELECT 'jobs|' || count(*) FROM tollgate.jobs
UNION ALL SELECT 'unanswered_jobs|' || count(*) FROM tollgate.jobs j
            WHERE NOT EXISTS (SELECT 1 FROM answered a WHERE a.job_id = j.id)
UNION ALL SELECT 'missing_jobs|' || count(*) FROM answered a
            WHERE NOT EXISTS (SELECT 1 FROM tollgate.jobs j WHERE j.id = a.job_id)
UNION ALL SELECT 'completed|' || count(*) FROM tollgate.jobs WHERE status = 'completed'
UNION ALL SELECT 'statuses|' || string_agg(status || ' ' || n, ', ' ORDER BY status)
            FROM (SELECT status::text, count(*) AS n FROM tollgate.jobs GROUP BY 1) s
UNION ALL SELECT 'open|' || count(*) FROM tollgate.jobs WHERE status IN ('queued', 'in_progress')
UNION ALL SELECT 'lost|' || count(*) FROM everyone e
            WHERE NOT EXISTS (SELECT 1 FROM tollgate.jobs j WHERE j.id = e.job_id AND j.status = 'completed')
UNION ALL SELECT 'completed_twice|' || count(*) FROM t WHERE completions > 1
UNION ALL SELECT 'ended_twice|' || count(*) FROM t WHERE endings > 1
UNION ALL SELECT 'charged_twice|' || count(*) FROM t WHERE charges > 1
UNION ALL SELECT 'rerun|' || count(*) FROM tollgate.jobs WHERE attempt > 1
UNION ALL SELECT 'starts_max|' || coalesce(max(starts), 0) FROM t
UNION ALL SELECT 'handbacks|' || coalesce(sum(handbacks), 0) FROM tollgate.jobs
UNION ALL SELECT 'republished|' || count(*) FROM (SELECT job_id FROM tollgate.outbox GROUP BY 1 HAVING count(*) > 1) r
UNION ALL SELECT 'unsent|' || count(*) FROM tollgate.outbox WHERE sent_at IS NULL
UNION ALL SELECT 'in_flight|' || in_flight FROM counters
UNION ALL SELECT 'reserved|' || reserved FROM counters
UNION ALL SELECT 'spent|' || spent FROM counters
UNION ALL SELECT 'charged_sum|' || coalesce(sum(charged_micro_usd), 0) FROM tollgate.jobs
UNION ALL SELECT 'cost_sum|' || coalesce(sum(cost_micro_usd), 0) FROM tollgate.jobs
UNION ALL SELECT 'open_reserved|' || coalesce(sum(reserved_micro_usd), 0) FROM tollgate.jobs
            WHERE status IN ('queued', 'in_progress')
UNION ALL SELECT 'charge_mismatch|' || count(*) FROM tollgate.jobs
            WHERE status NOT IN ('queued', 'in_progress')
              AND charged_micro_usd IS DISTINCT FROM least(coalesce(cost_micro_usd, 0), reserved_micro_usd)
UNION ALL SELECT 'window_requests|' || coalesce(sum(requests), 0) FROM tollgate.rate_windows
UNION ALL SELECT 'after_stop_jobs|' || count(*) FROM after_stop
UNION ALL SELECT 'publish_wait_max|' || coalesce(round(extract(epoch FROM max(sent_at - created_at))::numeric, 2)::text, 'n/a')
            FROM after_stop
UNION ALL SELECT 'publish_wait_unsent|' || count(*) FROM after_stop WHERE sent_at IS NULL
UNION ALL SELECT 'first_publish_after_stop|' || coalesce(round(extract(epoch FROM min(sent_at) - min(m.stopped))::numeric, 2)::text, 'n/a')
            FROM after_stop, m
UNION ALL SELECT 'publish_while_down|' || coalesce(round(extract(epoch FROM min(sent_at) - min(m.stopped))::numeric, 2)::text, 'none')
            FROM after_stop, m WHERE sent_at < m.restarted
UNION ALL SELECT 'start_while_down|' || coalesce(round(extract(epoch FROM min(started_at) - min(m.stopped))::numeric, 2)::text, 'none')
            FROM after_stop, m WHERE started_at < m.restarted
UNION ALL SELECT 'start_wait_max|' || coalesce(round(extract(epoch FROM max(started_at - created_at))::numeric, 2)::text, 'n/a')
            FROM after_stop
UNION ALL SELECT 'start_wait_p50_before|' || coalesce(round((percentile_cont(0.5) WITHIN GROUP
                 (ORDER BY extract(epoch FROM j.started_at - j.created_at)))::numeric, 3)::text, 'n/a')
            FROM tollgate.jobs j, m WHERE j.created_at < m.stopped
UNION ALL SELECT 'submit_max_during|' || coalesce(round(max(answered - submitted)::numeric, 2)::text, 'n/a')
            FROM cluster_test.submits, m
           WHERE to_timestamp(submitted) BETWEEN m.stopped AND m.restarted;
EOF

declare -A F
while IFS='|' read -r name value; do F[$name]=$value; done <"$WORK/figures"

ledger_problems=()
[ "${F[in_flight]}" = 0 ] || ledger_problems+=("key in_flight ${F[in_flight]}, not 0")
[ "${F[reserved]}" = "${F[open_reserved]}" ] \
    || ledger_problems+=("key reserved ${F[reserved]} µ\$ but open jobs reserve ${F[open_reserved]}")
[ "${F[spent]}" = "${F[charged_sum]}" ] \
    || ledger_problems+=("key spent ${F[spent]} µ\$ but jobs were charged ${F[charged_sum]} µ\$")
[ "${F[charge_mismatch]}" = 0 ] \
    || ledger_problems+=("${F[charge_mismatch]} ended jobs charged other than least(cost, reservation)")
[ "${F[window_requests]}" = "${F[jobs]}" ] \
    || ledger_problems+=("rate windows count ${F[window_requests]} requests for ${F[jobs]} jobs")
[ "${#ledger_problems[@]}" -eq 0 ] && BALANCED=yes || BALANCED=no

yesno() { [ "$1" = "$2" ] && echo yes || echo no; }
was_on() {  # was_on ROLE: where ROLE (process/name) was connected before the stop
    tr ',' '\n' <<<"$CONNS_BEFORE" | awk -v n="$1" '$1 == n {print $2}' | sort -u | paste -sd' '
}
connection_seen() {  # connection_seen ROLE: ROLE's connections around the stop
    local now_on before
    now_on=$(tr ',' '\n' <<<"$CONNS_DURING" | awk -v n="$1" '$1 == n {print $2}' | sort -u | paste -sd' ')
    before=$(was_on "$1")
    echo "before the stop on ${before:-none}; on a surviving node first seen ${BACK[$1]:-never}; just before the restart on ${now_on:-none}"
}
resumed() {  # resumed FIGURE: "yes, X s after the stop" or "NO"
    if [ "${F[$1]}" = none ]; then
        echo "NO: not once in the $(python3 -c "print(f'{$RESTARTED - $STOPPED:.1f}')") s the node was down"
    else
        echo "yes, first ${F[$1]} s after the stop"
    fi
}

FAIL=()
[ "${F[lost]}" = 0 ] || FAIL+=("${F[lost]} admitted jobs did not complete")
[ "${F[completed_twice]}" = 0 ] || FAIL+=("${F[completed_twice]} jobs completed more than once")
[ "${F[ended_twice]}" = 0 ] || FAIL+=("${F[ended_twice]} jobs ended more than once")
[ "${F[charged_twice]}" = 0 ] || FAIL+=("${F[charged_twice]} jobs charged more than once")
[ "$BALANCED" = yes ] || FAIL+=("ledger: ${ledger_problems[*]}")
[ "${F[admitted]}" -gt 0 ] || FAIL+=("no job was admitted")
[ "${F[publish_while_down]}" != none ] \
    || FAIL+=("the front published nothing while $STOPPED_NODE was down (its connection on a surviving node: ${BACK[front/publisher]:-never seen})")
[ "${F[start_while_down]}" != none ] \
    || FAIL+=("the worker started no job admitted after the stop while $STOPPED_NODE was down (its connection on a surviving node: ${BACK[worker/worker]:-never seen})")
[ -n "$NEW_LEADER" ] || FAIL+=("$QUEUE had no leader while $STOPPED_NODE was down")

row() { printf '%-30s %s\n' "$1" "$2"; }
line() { printf '%s\n' "--------------------------------------------------------------------------------"; }
{
    echo
    echo "=========================== tollgate cluster failover test ==========================="
    row "cluster" "$(node_name 1) $(node_name 2) $(node_name 3) (AMQP $(node_port 1)-$(node_port 3))"
    row "tollgate AMQP_URL" "$AMQP_URL"
    row "load" "$RATE submits/s for $LOAD_SECONDS s from $CLIENTS clients; mock-1 jobs take ~$((MOCK_DELAY_MS * 20)) ms"
    row "stopped" "$STOPPED_NODE, $ROLE, $(python3 -c "print(f'{$STOPPED - $LOAD_START:.1f}')") s into the load: $STOP_HOW"
    row "leader while down" "${NEW_LEADER:-none seen while the node was down}${ELECTED:+ (seen ${ELECTED} s after the stop)}"
    row "started again" "$(python3 -c "print(f'{$RESTARTED - $LOAD_START:.1f}')") s into the load; back in the cluster and online in $QUEUE ${REJOINED} s later"
    while IFS= read -r group; do row "queues" "$group"; done <<<"$QUEUE_LAYOUT"
    row "connections before the stop" "$CONNS_BEFORE"
    row "connections before the restart" "${CONNS_DURING:-none}"
    row "connections at the end" "${CONNS_AFTER:-none}"
    row "front published while down" "$(resumed publish_while_down) (RabbitMQ confirmed a job admitted after the stop)"
    row "worker consumed while down" "$(resumed start_while_down) (a job admitted after the stop started)"
    for role in "${ROLES[@]}"; do row "connection $role" "$(connection_seen "$role")"; done
    row "processes alive at the end" "front $FRONT_ALIVE, worker $WORKER_ALIVE"
    line
    row "submits sent" "${F[submitted]}"
    row "jobs admitted (2xx)" "${F[admitted]}"
    row "submits refused (non-2xx)" "${F[refused]}${F[refused_detail]:+ (${F[refused_detail]})}"
    row "submits without an answer" "${F[no_answer]}"
    row "jobs in the database" "${F[jobs]} (admitted but the client saw no answer: ${F[unanswered_jobs]}; 2xx ids without a job row: ${F[missing_jobs]})"
    row "jobs completed" "${F[completed]} (by status: ${F[statuses]})"
    row "jobs not terminal" "${F[open]}$([ "$DRAINED" = 1 ] && echo " (all ended ${DRAIN_SECONDS} s after the load)" || echo " after waiting $DRAIN_TIMEOUT s")"
    row "LOST (admitted, not completed)" "${F[lost]}"
    row "completed more than once" "${F[completed_twice]}"
    row "ended more than once" "${F[ended_twice]}"
    row "charged more than once" "${F[charged_twice]}"
    row "jobs run more than once" "${F[rerun]} (attempt > 1; most attempts of one job: ${F[starts_max]}; hand-backs: ${F[handbacks]})"
    row "jobs published again" "${F[republished]} (more than one outbox row); outbox rows never confirmed: ${F[unsent]}"
    row "ledger balanced" "$BALANCED (in_flight ${F[in_flight]}, reserved ${F[reserved]} µ\$, spent ${F[spent]} µ\$ = charged ${F[charged_sum]} µ\$ (cost ${F[cost_sum]} µ\$), rate windows ${F[window_requests]} requests for ${F[jobs]} jobs)"
    for problem in "${ledger_problems[@]}"; do row "" "ledger: $problem"; done
    line
    row "publishing resumed after" "${F[publish_wait_max]} s: the longest wait from admission to RabbitMQ's confirm among the ${F[after_stop_jobs]} jobs admitted after the stop (unconfirmed: ${F[publish_wait_unsent]}); the first confirm of one came ${F[first_publish_after_stop]} s after the stop"
    row "consuming resumed after" "${F[start_wait_max]} s: the longest wait from admission to the first attempt among them (median before the stop: ${F[start_wait_p50_before]} s)"
    row "nacks seen by tollgate" "$(grep -cE '\(nack\)|did not confirm' "$WORK/serve.log" "$WORK/worker.log" | sed 's|.*/||; s|\.log:| |' | paste -sd' ' | sed 's/ \([a-z]\)/, \1/g') (log lines: a nacked job publish, or a batch of events not all confirmed); channels replaced after a nack: $(cat "$WORK/serve.log" "$WORK/worker.log" | grep -c 'new RabbitMQ channel after a nack' || true)"
    row "slowest submit while down" "${F[submit_max_during]} s"
    row "drain" "${DRAIN_SECONDS} s after the load ended"
    row "run time" "$((SECONDS - TEST_T0)) s from the cluster's start to this summary (the build before it: $((TEST_T0 - T0)) s)"
    if [ "${#FAIL[@]}" -eq 0 ]; then
        row "RESULT" "PASS"
    else
        row "RESULT" "FAIL"
        for failure in "${FAIL[@]}"; do row "" "- $failure"; done
    fi
    echo "======================================================================================"
    echo "quorum_status of $QUEUE at the end:"
    echo "$QUORUM_AFTER"
}

if [ "${#FAIL[@]}" -ne 0 ]; then
    TEST_FAILED=1
    print_logs
    exit 1
fi
