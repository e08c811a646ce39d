#!/usr/bin/env bash
# tollgate behind PgBouncer in transaction mode (`pool_mode = transaction`), with and without
# `database.direct_url`.
#
#   A: DATABASE_URL through PgBouncer, DATABASE_DIRECT_URL straight to PostgreSQL: what outlives a
#      transaction (LISTEN, the migrations' session lock, creating the database) goes direct.
#   B: DATABASE_URL through PgBouncer and no direct URL: shows what such a pooler breaks.
#
# Each scenario gets a fresh PgBouncer and its own databases and RabbitMQ names. It runs two
# `tollgate migrate` at once on a missing database (both create it), two more on an empty one (the
# migrations' lock), then `tollgate serve` and `tollgate worker` as separate processes, and
# measures: a burst of background jobs until all are finished, how long a stream's
# `response.completed` lags the job's end, how long a revoked key still reads, the counters and the
# outbox in SQL, and the warnings and errors of every process. It prints a summary and exits
# non-zero unless scenario A is clean. Not part of `cargo test`; about two minutes once built.
#
# Needs root (apt-get), PostgreSQL on 127.0.0.1:5432 (user postgres, trust) and RabbitMQ on
# 127.0.0.1:5672 (guest/guest), as `deploy/services.sh` leaves them. Neither is reconfigured: the
# script runs its own PgBouncer on its own port, and removes its databases, queues and exchanges
# when it exits.
#
# PgBouncer 1.21 or later is needed: sqlx uses named prepared statements, which a transaction-mode
# PgBouncer carries only with `max_prepared_statements` > 0 (1.21+). Used, in this order: $PGBOUNCER
# (any version, to see what an older one does), a `pgbouncer` on the PATH if new enough, the
# distribution's package if its candidate is new enough, else one built from the source package of
# a newer Debian release ($PGBOUNCER_SOURCE_SUITE, default trixie; cached under /tmp).
#
# Environment: PGB_PORT (6433), FRONT_PORT (18480), WORKER_PORT (18481), JOBS (50),
# PGB_POOL_SIZE (5), KEY_CACHE_MS (10000), STREAM_FALLBACK_POLL_MS (2000).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PGB_PORT=${PGB_PORT:-6433}
FRONT_PORT=${FRONT_PORT:-18480}
WORKER_PORT=${WORKER_PORT:-18481}
JOBS=${JOBS:-50}
PGB_POOL_SIZE=${PGB_POOL_SIZE:-5}
KEY_CACHE_MS=${KEY_CACHE_MS:-10000}
STREAM_FALLBACK_POLL_MS=${STREAM_FALLBACK_POLL_MS:-2000}
PG_DIRECT=postgres://postgres@127.0.0.1:5432
PG_POOLED=postgres://postgres@127.0.0.1:$PGB_PORT
PGB_BUILD_CACHE=/tmp/tollgate-pgbouncer-build
BIN=$ROOT/target/release/tollgate

# The caller's settings must not leak into either scenario.
unset DATABASE_URL DATABASE_DIRECT_URL AMQP_URL TOLLGATE_LISTEN TOLLGATE_WORKER_LISTEN \
    TOLLGATE_CONFIG TOLLGATE_ADMIN_KEY TOLLGATE_ADMIN_KEY_FILE TOLLGATE_LOG_FORMAT RUST_LOG

STARTED=$EPOCHREALTIME
TAG=$(date +%s)$$
WORK=$(mktemp -d "/tmp/tollgate-pgbouncer-test.XXXXXX")
# PgBouncer runs as the postgres user (it refuses root) and writes its log and pid file here.
chmod 755 "$WORK"
RMQ_PREFIX="tg-pgb-$TAG"
DATABASES=()
PIDS=()
PGB_PID=
SAMPLER_PID=

log() { printf '[pgbouncer-test %6.1fs] %s\n' "$(elapsed)" "$*" >&2; }
elapsed() { awk -v a="$STARTED" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
die() { log "FAILED: $*"; exit 2; }

psql_direct() { # db sql
    psql -X -q -At -v ON_ERROR_STOP=1 "$PG_DIRECT/$1" -c "$2"
}

port_free() { ! ss -Hltn "sport = :$1" | grep -q .; }

# ---------------------------------------------------------------------------------------------
# probe.py: everything measured over HTTP, AMQP or in log files (python3's standard library).
# ---------------------------------------------------------------------------------------------
cat >"$WORK/probe.py" <<'PY'
import collections, csv, glob, http.client, json, os, re, socket, struct, subprocess, sys
import threading, time

def request(port, method, path, key, body=None, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Authorization": f"Bearer {key}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
        body = json.dumps(body)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data or b"null")
        except ValueError:
            return resp.status, None
    except OSError as e:
        return 0, {"error": str(e)}
    finally:
        conn.close()

def submit(port, key, n, model, out):
    """n background jobs at once (threads released together)."""
    barrier = threading.Barrier(n)
    results = [None] * n
    def one(i):
        barrier.wait()
        results[i] = request(port, "POST", "/v1/responses", key,
                             {"model": model, "input": f"pgbouncer job {i}", "background": True})
    started = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads: t.start()
    for t in threads: t.join()
    ids = [b["id"] for s, b in results if s == 200 and isinstance(b, dict) and "id" in b]
    codes = collections.Counter(str(s) for s, _ in results)
    refused = collections.Counter(
        (b.get("error") or {}).get("code") or str(b.get("error")) if isinstance(b, dict) else "?"
        for s, b in results if s != 200)
    json.dump({"ids": ids, "http": codes, "refused": refused,
               "secs": round(time.time() - started, 3)}, open(out, "w"))

def wait_terminal(port, key, ids_file, timeout, out):
    ids = json.load(open(ids_file))["ids"]
    pending, final, started = set(ids), {}, time.time()
    while pending and time.time() - started < timeout:
        for job in list(pending):
            status, body = request(port, "GET", f"/v1/responses/{job}", key)
            if status == 200 and body.get("status") not in ("queued", "in_progress"):
                final[job] = body["status"]
                pending.discard(job)
        if pending:
            time.sleep(0.25)
    json.dump({"terminal": collections.Counter(final.values()), "pending": len(pending),
               "secs": round(time.time() - started, 3)}, open(out, "w"))

def stream(port, key, model, direct_db, out):
    """A background job followed live with curl -sN; every event line time-stamped."""
    result = {"ok": False}
    status, body = request(port, "POST", "/v1/responses", key,
                           {"model": model, "input": "stream me", "background": True})
    if status != 200:
        result["error"] = f"submit answered {status}: {body}"
        json.dump(result, open(out, "w")); return
    job = body["id"]
    opened = time.time()
    curl = subprocess.Popen(
        ["curl", "-sN", "--max-time", "30", "-H", f"Authorization: Bearer {key}",
         f"http://127.0.0.1:{port}/v1/responses/{job}?stream=true"],
        stdout=subprocess.PIPE, text=True)
    events, completed_at = [], None
    for line in curl.stdout:
        if line.startswith("event: "):
            events.append((time.time(), line[7:].strip()))
            if events[-1][1] in ("response.completed", "response.failed",
                                 "response.cancelled", "response.incomplete"):
                completed_at = events[-1][0]
                break
    curl.kill(); curl.wait()
    uuid = job.removeprefix("resp_")
    finished = subprocess.run(
        ["psql", "-X", "-At", f"{direct_db}", "-c",
         f"SELECT extract(epoch FROM started_at), extract(epoch FROM finished_at), status "
         f"FROM tollgate.jobs WHERE id = '{uuid}'"],
        capture_output=True, text=True).stdout.strip().split("|")
    started_at = float(finished[0]) if finished[0] else None
    finished_at = float(finished[1]) if len(finished) > 1 and finished[1] else None
    gaps = [b[0] - a[0] for a, b in zip(events, events[1:])]
    result.update(
        id=job, events=len(events), last=events[-1][1] if events else None,
        ok=completed_at is not None and finished_at is not None,
        live=finished_at is not None and opened < finished_at,
        run_ms=round((finished_at - started_at) * 1000) if started_at and finished_at else None,
        lag_ms=round((completed_at - finished_at) * 1000) if completed_at and finished_at else None,
        max_gap_ms=round(max(gaps) * 1000) if gaps else None)
    json.dump(result, open(out, "w"))

def admin_key(port, out):
    status, body = request(port, "POST", "/admin/keys", os.environ["TOLLGATE_ADMIN_KEY"],
                           {"name": "pgb", "rpm_limit": 100000})
    if status != 201:
        sys.exit(f"POST /admin/keys answered {status}: {body}")
    open(out, "w").write(f"{body['id']}\n{body['key']}\n")

def revoke(port, key, key_id, job, cap_ms, direct_db, out, errlog, *command):
    """Reads with the key until the revoke shows: the first 401 after the revoke returned. With
    `keys revoke` when a command is given and it works, else with the same UPDATE in psql (not
    through the front's admin API: the front would drop the key from its own cache at once, and
    what is measured is how the change reaches a front)."""
    result = {}
    result["before"] = request(port, "GET", f"/v1/responses/{job}", key)[0]
    t0 = time.time()
    if command:
        done = subprocess.run(list(command), capture_output=True, text=True)
        open(errlog, "a").write(done.stderr)
        result["cli_rc"] = done.returncode
    if not command or done.returncode != 0:
        t0 = time.time()
        result["sql_rc"] = subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", direct_db, "-c",
             f"UPDATE tollgate.api_keys SET revoked_at = now() WHERE id = '{key_id}'"],
            capture_output=True).returncode
    t1 = time.time()
    result["revoke_ms"] = round((t1 - t0) * 1000)
    result["revoke_rc"] = 0 if result.get("cli_rc") == 0 or result.get("sql_rc") == 0 else 1
    polls, codes, first_401 = 0, collections.Counter(), None
    while time.time() - t1 < cap_ms / 1000:
        status = request(port, "GET", f"/v1/responses/{job}", key)[0]
        polls += 1; codes[str(status)] += 1
        if status == 401:
            first_401 = time.time(); break
        time.sleep(0.02)
    result.update(polls=polls, http=codes,
                  to_401_ms=round((first_401 - t1) * 1000) if first_401 else None)
    # Admission itself checks the key in its transaction, whatever a front's cache holds.
    result["post_after"] = request(port, "POST", "/v1/responses", key,
                                   {"model": "mock-1", "input": "after revoke", "background": True})[0]
    json.dump(result, open(out, "w"))

def pools(samples, database, out):
    """Largest client and server connection counts PgBouncer showed for the database."""
    best = {"clients": 0, "waiting": 0, "servers": 0}
    header = None
    for row in csv.reader(open(samples)):
        if row and row[0] == "database":
            header = row; continue
        if not header or len(row) != len(header): continue
        r = dict(zip(header, row))
        if r["database"] != database: continue
        n = lambda *cols: sum(int(r.get(c) or 0) for c in cols)
        best["clients"] = max(best["clients"], n("cl_active", "cl_waiting"))
        best["waiting"] = max(best["waiting"], n("cl_waiting"))
        best["servers"] = max(best["servers"], n("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))
    json.dump(best, open(out, "w"))

NORMALIZE = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"resp_[0-9a-f]{32}"), "<job>"),
    (re.compile(r"0x[0-9a-f]+"), "<ptr>"),
    (re.compile(r"\d+(\.\d+)?"), "<n>"),
]
def normalize(text):
    for pattern, repl in NORMALIZE:
        text = pattern.sub(repl, text)
    return text[:220]

# Matched ignoring case, but LISTEN as written (PgBouncer logs "listening on").
PATTERNS = ["prepared statement", "unsupported startup parameter", "advisory", "LISTEN",
            "NotificationResponse", "pooler error", "server conn crashed", "query_wait_timeout",
            "timed out", "panicked"]

def logs(directory, out):
    """WARN and ERROR lines of tollgate's processes (JSON lines; anything else that reads as a
    failure counts too), and WARNING/ERROR/FATAL lines of PgBouncer, grouped by kind."""
    kinds, pgb, hits = collections.Counter(), collections.Counter(), collections.Counter()
    closing = collections.Counter()
    for path in sorted(glob.glob(os.path.join(directory, "*.log"))):
        name = os.path.basename(path)[:-4]
        for line in open(path, errors="replace"):
            line = line.rstrip("\n")
            for p in PATTERNS:
                if (p in line) if p == "LISTEN" else (p.lower() in line.lower()): hits[p] += 1
            if name == "pgbouncer":
                m = re.match(r"\S+ \S+ \S+ \[\d+\] (\w+) (.*)", line)
                if not m: continue
                level, text = m.groups()
                text = re.sub(r"^[CS]-0x[0-9a-f]+: \S+ ", "", text)
                if level in ("WARNING", "ERROR", "FATAL"):
                    pgb[f"{level} {normalize(text)}"] += 1
                elif "closing because:" in text:
                    closing[normalize(text.split("closing because:", 1)[1].split("(age")[0].strip())] += 1
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                if re.search(r"error|warn|panic|fatal", line, re.I) and not line.startswith("  "):
                    kinds[f"{name}: {normalize(line)}"] += 1
                continue
            if entry.get("level") in ("WARN", "ERROR"):
                text = f'{entry["level"]} {entry.get("target", "")}: {entry.get("message", "")}'
                if "error" in entry: text += f' ({entry["error"].splitlines()[0]})'
                kinds[f"{name}: {normalize(text)}"] += 1
    json.dump({"tollgate": kinds, "pgbouncer": pgb, "pgbouncer_closing": closing,
               "patterns": hits}, open(out, "w"))

def amqp_delete(prefix, out):
    """Deletes the queues, then the exchanges, whose names start with prefix, over AMQP 0-9-1
    (no management plugin needed)."""
    def names(kind):
        done = subprocess.run(["rabbitmqctl", "-q", f"list_{kind}", "--no-table-headers", "name"],
                              capture_output=True, text=True, timeout=60)
        return [n.strip() for n in done.stdout.splitlines() if n.strip().startswith(prefix)]
    queues, exchanges = names("queues"), names("exchanges")
    sock = socket.create_connection(("127.0.0.1", 5672), timeout=10)
    buf = b""
    def recv(n):
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(65536)
            if not chunk: raise ConnectionError("broker closed the connection")
            buf += chunk
        data, buf = buf[:n], buf[n:]
        return data
    def frame():
        kind, channel, size = struct.unpack(">BHI", recv(7))
        payload = recv(size); recv(1)
        return kind, channel, payload
    def send(channel, cls, method, args=b""):
        payload = struct.pack(">HH", cls, method) + args
        sock.sendall(struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce")
    def expect(cls, method):
        while True:
            kind, channel, payload = frame()
            if kind != 1: continue
            got = struct.unpack(">HH", payload[:4])
            if got == (cls, method): return payload[4:]
            if got in ((20, 40), (10, 50)):
                code, = struct.unpack(">H", payload[4:6])
                raise RuntimeError(f"broker refused: {code} {payload[7:7 + payload[6]].decode()}")
    short = lambda s: struct.pack("B", len(s.encode())) + s.encode()
    sock.sendall(b"AMQP\x00\x00\x09\x01")
    expect(10, 10)
    send(0, 10, 11, struct.pack(">I", 0) + short("PLAIN") +
         struct.pack(">I", 12) + b"\x00guest\x00guest" + short("en_US"))
    tune = expect(10, 30)
    send(0, 10, 31, tune[:6] + struct.pack(">H", 0))
    send(0, 10, 40, short("/") + short("") + b"\x00")
    expect(10, 41)
    send(1, 20, 10, short(""))
    expect(20, 11)
    deleted = {"queues": 0, "exchanges": 0}
    for q in queues:
        send(1, 50, 40, struct.pack(">H", 0) + short(q) + b"\x00"); expect(50, 41)
        deleted["queues"] += 1
    for e in exchanges:
        send(1, 40, 20, struct.pack(">H", 0) + short(e) + b"\x00"); expect(40, 21)
        deleted["exchanges"] += 1
    send(0, 10, 50, struct.pack(">H", 200) + short("bye") + struct.pack(">HH", 0, 0))
    expect(10, 51)
    sock.close()
    left = names("queues") + names("exchanges")
    deleted["left"] = left
    json.dump(deleted, open(out, "w"))

if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "submit": submit(int(args[0]), args[1], int(args[2]), args[3], args[4])
    elif command == "wait": wait_terminal(int(args[0]), args[1], args[2], float(args[3]), args[4])
    elif command == "stream": stream(int(args[0]), args[1], args[2], args[3], args[4])
    elif command == "revoke":
        revoke(int(args[0]), args[1], args[2], args[3], float(args[4]), *args[5:])
    elif command == "admin-key": admin_key(int(args[0]), args[1])
    elif command == "pools": pools(args[0], args[1], args[2])
    elif command == "logs": logs(args[0], args[1])
    elif command == "amqp-delete": amqp_delete(args[0], args[1])
    else: sys.exit(f"unknown command {command}")
PY
probe() { python3 "$WORK/probe.py" "$@"; }

# ---------------------------------------------------------------------------------------------
# Cleaning up: every process this script started, by its pid; its databases; its RabbitMQ names.
# ---------------------------------------------------------------------------------------------
# Sets STOPPED to the exit code, or "killed" when it needed SIGKILL. (Not for $(…): a subshell
# cannot wait for its parent's children.)
stop_pid() { # pid seconds
    local pid=$1 limit=$(($2 * 10)) rc=0
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && ((limit-- > 0)); do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        STOPPED=killed
        return
    fi
    wait "$pid" 2>/dev/null || rc=$?
    STOPPED=$rc
}

stop_pgbouncer() {
    if [[ -n $SAMPLER_PID ]]; then stop_pid "$SAMPLER_PID" 2; SAMPLER_PID=; fi
    if [[ -n $PGB_PID ]]; then
        kill -TERM "$PGB_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$PGB_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PGB_PID" 2>/dev/null || true
        PGB_PID=
    fi
}

cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && stop_pid "$pid" 5; done
    stop_pgbouncer
    for db in "${DATABASES[@]}"; do
        psql -X -q "$PG_DIRECT/postgres" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 ||
            log "could not drop database $db"
    done
    if probe amqp-delete "$RMQ_PREFIX" "$WORK/rabbitmq-cleanup.json" 2>"$WORK/rabbitmq-cleanup.err"; then
        log "RabbitMQ: deleted $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["queues"], "queues,", d["exchanges"], "exchanges; left:", d["left"] or "none")' "$WORK/rabbitmq-cleanup.json")"
    else
        log "RabbitMQ clean-up failed ($(tail -n 1 "$WORK/rabbitmq-cleanup.err")); remove names starting with $RMQ_PREFIX by hand"
    fi
    log "logs kept in $WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
set -E
on_error() { log "stopped at line $1: ${2%%$'\n'*}"; }
trap 'on_error $LINENO "$BASH_COMMAND"' ERR

# ---------------------------------------------------------------------------------------------
# PgBouncer: one that carries prepared statements in transaction mode.
# ---------------------------------------------------------------------------------------------
MIN_PGB=1.21
pgb_version() { "$1" --version 2>/dev/null | awk 'NR == 1 { print $2 }'; }
version_ge() { [[ -n $1 ]] && printf '%s\n%s\n' "$2" "$1" | sort -V -C; }

ensure_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return
    log "installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
}

# Builds PgBouncer from the source package of a newer Debian release, fetched with apt through
# the machine's own Debian mirror into a private apt state (the machine's sources are untouched).
build_pgbouncer() {
    local suite=${PGBOUNCER_SOURCE_SUITE:-trixie} built
    built=$(ls -d "$PGB_BUILD_CACHE"/src-*/pgbouncer 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $built ]] && version_ge "$(pgb_version "$built")" "$MIN_PGB"; then
        echo "$built"
        return
    fi
    log "building PgBouncer from Debian $suite's source package (once; cached in $PGB_BUILD_CACHE)"
    ensure_packages gcc make pkg-config libevent-dev libssl-dev dpkg-dev
    local mirror apt=$PGB_BUILD_CACHE/apt
    mirror=$(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' 2>/dev/null |
        grep -v security | sed 's:/*$::' | sort -u | head -n 1 || true)
    [[ -n $mirror ]] || die "no Debian mirror found in the apt sources"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$PGB_BUILD_CACHE/dl"
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" \
        >"$apt/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache")
    apt-get "${opts[@]}" update -qq >"$PGB_BUILD_CACHE/build.log" 2>&1 ||
        die "apt-get update of $suite's sources failed: see $PGB_BUILD_CACHE/build.log"
    (cd "$PGB_BUILD_CACHE/dl" && apt-get "${opts[@]}" source --download-only pgbouncer) \
        >>"$PGB_BUILD_CACHE/build.log" 2>&1 || die "apt-get source pgbouncer failed: see $PGB_BUILD_CACHE/build.log"
    local dsc version
    dsc=$(ls "$PGB_BUILD_CACHE"/dl/pgbouncer_*.dsc | sort -V | tail -n 1)
    version=$(basename "$dsc" .dsc | cut -d_ -f2)
    rm -rf "$PGB_BUILD_CACHE/src-$version"
    (
        dpkg-source -x "$dsc" "$PGB_BUILD_CACHE/src-$version" &&
            cd "$PGB_BUILD_CACHE/src-$version" &&
            ./configure --without-cares --without-systemd --without-pam --without-ldap &&
            make -j"$(nproc)"
    ) >>"$PGB_BUILD_CACHE/build.log" 2>&1 || die "building PgBouncer failed: see $PGB_BUILD_CACHE/build.log"
    chmod -R a+rX "$PGB_BUILD_CACHE"
    echo "$PGB_BUILD_CACHE/src-$version/pgbouncer"
}

find_pgbouncer() {
    if [[ -n ${PGBOUNCER:-} ]]; then echo "$PGBOUNCER"; return; fi
    local found candidate
    found=$(command -v pgbouncer || ls /usr/sbin/pgbouncer 2>/dev/null || true)
    if [[ -n $found ]] && version_ge "$(pgb_version "$found")" "$MIN_PGB"; then
        echo "$found"
        return
    fi
    [[ -n $found ]] && log "$found is PgBouncer $(pgb_version "$found"): older than $MIN_PGB"
    candidate=$(apt-cache policy pgbouncer 2>/dev/null | awk '/Candidate:/ { print $2 }')
    if version_ge "${candidate%%-*}" "$MIN_PGB"; then
        log "installing the distribution's pgbouncer $candidate"
        apt-get install -y -qq pgbouncer >/dev/null
        echo /usr/sbin/pgbouncer
        return
    fi
    log "the distribution's pgbouncer is ${candidate:-not available}: older than $MIN_PGB"
    build_pgbouncer
}

PGB_BIN=$(find_pgbouncer)
PGB_VERSION=$(pgb_version "$PGB_BIN")
[[ -n $PGB_VERSION ]] || die "$PGB_BIN does not run (missing libraries?)"
log "PgBouncer $PGB_VERSION: $PGB_BIN"

start_pgbouncer() { # directory
    local dir=$1 prepared=""
    mkdir -p "$dir"
    # With trust, PgBouncer still wants the user in its auth file.
    printf '"postgres" ""\n' >"$dir/users.txt"
    if version_ge "$PGB_VERSION" "$MIN_PGB"; then
        # sqlx prepares every query as a named statement and caches it per connection (100).
        prepared="max_prepared_statements = 200"
    fi
    cat >"$dir/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=5432

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = trust
auth_file = $dir/users.txt
admin_users = postgres
pool_mode = transaction
$prepared
; Few server connections for every client connection, so they are really shared.
default_pool_size = $PGB_POOL_SIZE
reserve_pool_size = 0
max_client_conn = 400
; sqlx sends extra_float_digits at start-up, which PgBouncer does not track.
ignore_startup_parameters = extra_float_digits
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
EOF
    : >"$dir/pgbouncer.log"
    ((EUID == 0)) && chown -R postgres "$dir"
    local run=("$PGB_BIN" "$dir/pgbouncer.ini")
    # PgBouncer refuses to run as root; setpriv execs it, so $! is PgBouncer's own pid.
    ((EUID == 0)) && run=(setpriv --reuid=postgres --regid=postgres --init-groups "${run[@]}")
    "${run[@]}" >>"$dir/pgbouncer.out" 2>&1 &
    PGB_PID=$!
    for _ in $(seq 50); do
        psql -X -At "$PG_POOLED/pgbouncer" -c 'SHOW VERSION' >/dev/null 2>&1 && break
        kill -0 "$PGB_PID" 2>/dev/null || die "PgBouncer exited: $(tail -n 3 "$dir/pgbouncer.log")"
        sleep 0.1
    done
    # What PgBouncer shows of its pools, five times a second, for the summary.
    (while :; do
        psql -X --csv "$PG_POOLED/pgbouncer" -c 'SHOW POOLS' 2>/dev/null
        sleep 0.2
    done) >"$dir/pools.csv" &
    SAMPLER_PID=$!
}

for p in "$PGB_PORT" "$FRONT_PORT" "$WORKER_PORT"; do
    port_free "$p" || die "port $p is in use (set PGB_PORT, FRONT_PORT or WORKER_PORT)"
done
psql_direct postgres 'SELECT 1' >/dev/null || die "PostgreSQL is not reachable at $PG_DIRECT"

# ---------------------------------------------------------------------------------------------
# tollgate
# ---------------------------------------------------------------------------------------------
log "cargo build --release --locked --bin tollgate"
build_started=$EPOCHREALTIME
(cd "$ROOT" && cargo build --release --locked --bin tollgate) >"$WORK/cargo-build.txt" 2>&1 ||
    { tail -n 30 "$WORK/cargo-build.txt" >&2; die "cargo build failed"; }
BUILD_SECS=$(awk -v a="$build_started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')
MIGRATIONS=$(ls "$ROOT"/migrations/*.sql | wc -l)

fact() { printf '%s\t%s\n' "$1" "$2" >>"$SDIR/facts.tsv"; }

advisory_locks() {
    psql_direct postgres "SELECT count(*) FILTER (WHERE granted) || ' held, ' || count(*) FILTER (WHERE NOT granted) || ' waiting' FROM pg_locks l JOIN pg_database d ON d.oid = l.database WHERE l.locktype = 'advisory' AND d.datname = '$DB'"
}

# Runs a tollgate command with a time limit, output in $SDIR/NAME.out and .log. Sets CLI_RC (the
# exit code, or "timeout"). On a time-out the advisory locks are noted first: a migration lock
# left on a pooled server connection makes every later `migrate` (each command runs one) wait.
cli() { # name seconds args...
    local name=$1 limit=$2 pid deadline
    shift 2
    "$BIN" "$@" >"$SDIR/$name.out" 2>"$SDIR/$name.log" &
    pid=$!
    deadline=$((SECONDS + limit))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        fact "${name}_timeout" "after $limit s; advisory locks: $(advisory_locks)"
        kill -KILL "$pid"
        wait "$pid" 2>/dev/null || true
        CLI_RC=timeout
        return 1
    fi
    CLI_RC=0
    wait "$pid" || CLI_RC=$?
    [[ $CLI_RC == 0 ]]
}

write_config() { # scenario letter
    local names="$RMQ_PREFIX-$1"
    cat >"$SDIR/tollgate.toml" <<EOF
[database]
url = "$PG_POOLED/$DB"
max_connections = 20

[amqp]
exchange = "$names"
queue = "$names.jobs"
dead_letter_exchange = "$names.dlx"
dead_letter_queue = "$names.dead"
connection_name = "$names"

[server]
listen = "127.0.0.1:$FRONT_PORT"
key_cache_ms = $KEY_CACHE_MS
stream_fallback_poll_ms = $STREAM_FALLBACK_POLL_MS

[worker]
listen = "127.0.0.1:$WORKER_PORT"

[events]
exchange = "$names.events"

[webhooks]
queue = "$names.webhooks"

[[models]]
name = "mock-1"
provider = "mock"
input_price_per_1m = 1.0
output_price_per_1m = 2.0
mock_deltas = 20
mock_delay_ms = 10

# Long enough (about 2 s) for a stream to be open before the job ends.
[[models]]
name = "mock-slow"
provider = "mock"
mock_deltas = 20
mock_delay_ms = 100
EOF
}

wait_ready() { # port pid seconds
    local deadline=$((SECONDS + $3))
    while ((SECONDS < deadline)); do
        kill -0 "$2" 2>/dev/null || return 1
        curl -fs -o /dev/null --max-time 2 "http://127.0.0.1:$1/readyz" && return 0
        sleep 0.2
    done
    return 1
}

run_scenario() { # letter description direct(yes|no)
    local letter=$1 with_direct=$3
    SDIR=$WORK/$letter
    mkdir -p "$SDIR"
    DB="tollgate_pgbouncer_test_${TAG}_${letter,,}"
    DATABASES+=("$DB")
    fact title "$2"
    write_config "$letter"
    log "scenario $letter: $2"
    start_pgbouncer "$SDIR/pgbouncer"

    export TOLLGATE_CONFIG=$SDIR/tollgate.toml DATABASE_URL=$PG_POOLED/$DB
    export TOLLGATE_LOG_FORMAT=json RUST_LOG=info,sqlx=warn RUST_BACKTRACE=0
    TOLLGATE_ADMIN_KEY=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    export TOLLGATE_ADMIN_KEY
    export TOLLGATE_LISTEN=127.0.0.1:$FRONT_PORT TOLLGATE_WORKER_LISTEN=127.0.0.1:$WORKER_PORT
    if [[ $with_direct == yes ]]; then export DATABASE_DIRECT_URL=$PG_DIRECT/$DB; else unset DATABASE_DIRECT_URL; fi

    # Two processes starting at once on a missing database: both find it missing, both create it,
    # and the one that loses must go on. A database of its own, so that the lock below is tested
    # whatever happens here.
    local create_db=${DB}_create m1 m2 t0 rc1=0 rc2=0
    DATABASES+=("$create_db")
    (
        export DATABASE_URL=$PG_POOLED/$create_db
        [[ $with_direct == yes ]] && export DATABASE_DIRECT_URL=$PG_DIRECT/$create_db
        timeout 30 "$BIN" migrate 2>"$SDIR/create-1.log" & m1=$!
        timeout 30 "$BIN" migrate 2>"$SDIR/create-2.log" & m2=$!
        wait "$m1" || rc1=$?
        wait "$m2" || rc2=$?
        echo "$rc1 $rc2"
    ) >"$SDIR/create.rc"
    fact create_rc "$(cat "$SDIR/create.rc")"
    fact create_error "$(grep -h '^Error: ' "$SDIR"/create-*.log | head -n 1 | sed 's/^Error: //' || true)"
    # PgBouncer first lets go of its server connections to it, which a forced drop would cut.
    psql -X -q "$PG_POOLED/pgbouncer" -c "KILL $create_db" >/dev/null 2>&1 || true
    psql_direct postgres "DROP DATABASE IF EXISTS \"$create_db\" WITH (FORCE)" >/dev/null

    # Two processes migrating an empty database at once: the migrations' lock decides.
    psql_direct postgres "CREATE DATABASE \"$DB\"" >/dev/null
    rc1=0 rc2=0
    t0=$(now_ms)
    timeout 30 "$BIN" migrate 2>"$SDIR/migrate-1.log" & m1=$!
    timeout 30 "$BIN" migrate 2>"$SDIR/migrate-2.log" & m2=$!
    wait "$m1" || rc1=$?
    wait "$m2" || rc2=$?
    fact migrate_rc "$rc1 $rc2"
    fact migrate_ms $(($(now_ms) - t0))
    fact migrate_error "$(grep -h '^Error: ' "$SDIR"/migrate-*.log | head -n 1 | sed 's/^Error: //' || true)"
    fact migrations_applied "$(psql_direct "$DB" "SELECT count(*) FILTER (WHERE success) FROM _sqlx_migrations" 2>/dev/null || echo none)"

    local serve worker ready=no
    "$BIN" serve >"$SDIR/serve.out" 2>"$SDIR/serve.log" & serve=$!
    PIDS+=("$serve")
    "$BIN" worker >"$SDIR/worker.out" 2>"$SDIR/worker.log" & worker=$!
    PIDS+=("$worker")
    local front_ready=no worker_ready=no
    wait_ready "$FRONT_PORT" "$serve" 30 && front_ready=yes
    wait_ready "$WORKER_PORT" "$worker" 30 && worker_ready=yes
    fact ready "$front_ready $worker_ready"
    fact advisory_locks "$(advisory_locks)"
    if [[ $front_ready != yes || $worker_ready != yes ]] &&
        [[ $(advisory_locks) != "0 held, 0 waiting" ]]; then
        # A process waits for the migrations' lock that an earlier one left on a pooled server
        # connection. End that server session, as an operator would, so that the rest is measured.
        fact lock_released "$(psql_direct postgres "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l JOIN pg_database d ON d.oid = l.database WHERE l.locktype = 'advisory' AND l.granted AND d.datname = '$DB'") session(s) holding it ended"
        wait_ready "$FRONT_PORT" "$serve" 30 && front_ready=yes
        wait_ready "$WORKER_PORT" "$worker" 30 && worker_ready=yes
        fact ready_after_release "$front_ready $worker_ready"
    fi
    [[ $front_ready == yes && $worker_ready == yes ]] && ready=yes

    if [[ $ready == yes ]]; then
        local key key_id revoke_cli=()
        if cli keys-create 20 keys create --name pgb --rpm 100000; then
            revoke_cli=(timeout 20 "$BIN" keys revoke)
        else
            # The rest is still worth measuring: the front makes the key instead.
            local why="exit $CLI_RC"
            [[ $CLI_RC == timeout ]] && why="timed out"
            if probe admin-key "$FRONT_PORT" "$SDIR/keys-create.out" 2>"$SDIR/admin-key.err"; then
                fact key_create "keys create $why; key made through the admin API"
            else
                fact key_create "keys create $why; the admin API failed too: $(tail -n 1 "$SDIR/admin-key.err")"
            fi
        fi
        key=$(tail -n 1 "$SDIR/keys-create.out")
        key_id=$(grep -oE '[0-9a-f]{8}-[0-9a-f-]{27}' "$SDIR/keys-create.out" | head -n 1 || true)
        if [[ -n $key && -n $key_id ]]; then
            log "  $JOBS background jobs at once"
            probe submit "$FRONT_PORT" "$key" "$JOBS" mock-1 "$SDIR/submit.json"
            probe wait "$FRONT_PORT" "$key" "$SDIR/submit.json" 60 "$SDIR/wait.json"
            log "  one job streamed live"
            probe stream "$FRONT_PORT" "$key" mock-slow "$PG_DIRECT/$DB" "$SDIR/stream.json"
            log "  key revoked; reading with it every 20 ms until 401"
            local job
            job=$(python3 -c 'import json,sys; print((json.load(open(sys.argv[1]))["ids"] or ["none"])[0])' "$SDIR/submit.json")
            probe revoke "$FRONT_PORT" "$key" "$key_id" "$job" $((KEY_CACHE_MS + 5000)) \
                "$PG_DIRECT/$DB" "$SDIR/revoke.json" "$SDIR/keys-revoke.log" ${revoke_cli[@]+"${revoke_cli[@]}"} \
                ${revoke_cli[@]+"$key_id"}
        fi
    fi
    # Whatever is still queued or running gets a moment before the books are read.
    for _ in $(seq 50); do
        [[ $(psql_direct "$DB" "SELECT count(*) FROM tollgate.jobs WHERE status IN ('queued', 'in_progress')" 2>/dev/null || echo 0) == 0 ]] && break
        sleep 0.2
    done
    fact sql_jobs "$(psql_direct "$DB" "SELECT count(*) FROM tollgate.jobs" 2>/dev/null || echo none)"
    fact sql_by_status "$(psql_direct "$DB" "SELECT string_agg(status || ' ' || n, ', ' ORDER BY status) FROM (SELECT status, count(*) AS n FROM tollgate.jobs GROUP BY status) s" 2>/dev/null || echo none)"
    fact sql_not_completed "$(psql_direct "$DB" "SELECT count(*) FROM tollgate.jobs WHERE status NOT IN ('completed')" 2>/dev/null || echo none)"
    fact sql_in_flight "$(psql_direct "$DB" "SELECT coalesce(sum(in_flight), 0) FROM tollgate.key_counters" 2>/dev/null || echo none)"
    fact sql_outbox_unsent "$(psql_direct "$DB" "SELECT count(*) FROM tollgate.outbox WHERE sent_at IS NULL" 2>/dev/null || echo none)"
    psql -X --csv "$PG_POOLED/pgbouncer" -c 'SHOW STATS' >"$SDIR/stats.csv" 2>/dev/null || true

    local serve_rc
    stop_pid "$serve" 20
    serve_rc=$STOPPED
    stop_pid "$worker" 40
    fact exit_codes "$serve_rc $STOPPED"
    stop_pgbouncer
    probe pools "$SDIR/pgbouncer/pools.csv" "$DB" "$SDIR/pools.json"
    cp "$SDIR/pgbouncer/pgbouncer.log" "$SDIR/pgbouncer.log"
    probe logs "$SDIR" "$SDIR/logs.json"
    python3 - "$SDIR/stats.csv" "$DB" >>"$SDIR/facts.tsv" <<'PY'
import csv, sys
for r in csv.DictReader(open(sys.argv[1])):
    if r.get("database") == sys.argv[2]:
        print(f"pgb_stats\t{r['total_xact_count']} {r['total_query_count']} {int(r['total_wait_time']) // 1000}")
PY
    psql_direct postgres "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 || true
}

run_scenario A "DATABASE_URL through PgBouncer, DATABASE_DIRECT_URL direct" yes
run_scenario B "DATABASE_URL through PgBouncer, no direct URL" no

# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------
set +e
trap - ERR
PREPARED="max_prepared_statements = 200"
version_ge "$PGB_VERSION" "$MIN_PGB" || PREPARED="no max_prepared_statements (PgBouncer < $MIN_PGB)"
python3 - "$WORK" "$PGB_VERSION" "$PREPARED" "$PGB_POOL_SIZE" "$JOBS" "$MIGRATIONS" "$KEY_CACHE_MS" \
    "$STREAM_FALLBACK_POLL_MS" "$BUILD_SECS" "$(elapsed)" <<'PY'
import json, os, sys
work, pgb, prepared, pool, jobs, migrations, key_cache, fallback, build_secs, total = sys.argv[1:]
jobs, migrations = int(jobs), int(migrations)

def load(letter):
    d = os.path.join(work, letter)
    facts = dict(l.rstrip("\n").split("\t", 1) for l in open(os.path.join(d, "facts.tsv")))
    for name in ("submit", "wait", "stream", "revoke", "pools", "logs"):
        path = os.path.join(d, f"{name}.json")
        facts[name] = json.load(open(path)) if os.path.exists(path) else {}
    return facts

def row(label, a, b):
    if len(a) <= 40 and len(b) <= 40:
        print(f"  {label:<48} {a:<40} {b}")
    else:
        print(f"  {label}\n      A  {a}\n      B  {b}")

def ms(v):
    return "—" if v is None else f"{v} ms"

def cells(f):
    s, w, st, rv, p, lg = (f[k] for k in ("submit", "wait", "stream", "revoke", "pools", "logs"))
    out = {}
    rc = f["create_rc"].split()
    out["create"] = "ok" if rc == ["0", "0"] else f"exit {'/'.join(rc)}: {f['create_error'][:90]}"
    rc = f["migrate_rc"].split()
    out["migrate"] = (f"{'ok' if rc == ['0', '0'] else 'exit ' + '/'.join(rc)}, "
                      f"{f['migrations_applied']}/{migrations} applied, {f['migrate_ms']} ms")
    if rc != ["0", "0"]: out["migrate"] += f": {f['migrate_error'][:90]}"
    out["ready"] = "front {} / worker {}".format(*f["ready"].split())
    if "lock_released" in f:
        out["ready"] += ("; migrations' lock left on a pooled server connection: {}; then front {} / "
                         "worker {}".format(f["lock_released"], *f["ready_after_release"].split()))
    out["locks"] = f["advisory_locks"]
    out["admitted"] = f"{len(s.get('ids', []))}/{jobs}" + (f" (http {dict(s['http'])})" if s and set(s["http"]) != {"200"} else "")
    out["terminal"] = (", ".join(f"{k} {v}" for k, v in sorted(w.get("terminal", {}).items())) or "—") + \
        (f"; {w['pending']} still pending" if w.get("pending") else "") + (f" in {w['secs']} s" if w else "")
    out["sql"] = f"{f['sql_jobs']} / {f['sql_not_completed']} / {f['sql_in_flight']} / {f['sql_outbox_unsent']}"
    out["by_status"] = f["sql_by_status"] or "—"
    out["stream"] = "—" if not st else (f"no end event in 30 s ({st.get('events', 0)} events, last {st.get('last')})"
                     if not st.get("ok") else
                     f"{ms(st['lag_ms'])} (job ran {st['run_ms']} ms, {st['events']} events"
                     f"{'' if st['live'] else ', NOT live'})")
    out["gap"] = ms(st.get("max_gap_ms"))
    out["revoke"] = ("—" if not rv else
                     f"{ms(rv['to_401_ms'])} after revoke returned ({rv['polls']} reads)"
                     if rv.get("to_401_ms") is not None else
                     f"no 401 within {int(key_cache) + 5000} ms ({rv.get('polls')} reads)"
                     if rv.get("revoke_rc") == 0 else f"keys revoke failed (exit {rv.get('revoke_rc')})")
    how = "keys revoke" if rv.get("cli_rc") == 0 else "UPDATE in psql" + (
        f" (keys revoke: exit {rv['cli_rc']})" if "cli_rc" in rv else "")
    out["revoke_cli"] = f"{ms(rv.get('revoke_ms'))} via {how}" if rv else "—"
    ready = f.get("ready_after_release", f["ready"]) == "yes yes"
    out["key"] = f.get("key_create", "keys create ok" if ready else "—")
    if "keys-create_timeout" in f: out["key"] += f" (after {f['keys-create_timeout'][6:]})"
    out["post_after"] = str(rv.get("post_after", "—"))
    out["pools"] = f"{p.get('clients', '?')} / {p.get('servers', '?')} (most waiting {p.get('waiting', '?')})"
    stats = f.get("pgb_stats", "").split()
    out["stats"] = f"{stats[0]} / {stats[1]} / {stats[2]} ms" if len(stats) == 3 else "—"
    out["exit"] = "serve {} / worker {}".format(*f["exit_codes"].split())
    out["tg_lines"] = str(sum(lg.get("tollgate", {}).values()))
    out["pgb_lines"] = str(sum(lg.get("pgbouncer", {}).values()))
    return out

def clean(f, c):
    s, w, st, rv, lg = (f[k] for k in ("submit", "wait", "stream", "revoke", "logs"))
    problems = []
    if f["create_rc"].split() != ["0", "0"]:
        problems.append(f"creating the database from two processes at once: {f['create_error']}")
    if f["migrate_rc"].split() != ["0", "0"] or f["migrations_applied"] != str(migrations):
        problems.append("migrations")
    if f["ready"] != "yes yes": problems.append("not ready")
    if len(s.get("ids", [])) != jobs: problems.append("not all jobs admitted")
    if w.get("terminal", {}).get("completed") != jobs or w.get("pending"): problems.append("not all jobs completed")
    if f["sql_not_completed"] != "0" or f["sql_in_flight"] != "0" or f["sql_outbox_unsent"] != "0":
        problems.append("SQL checks")
    if not st.get("ok") or not st.get("live"): problems.append("stream")
    elif st["lag_ms"] > 1000: problems.append(f"stream completed {st['lag_ms']} ms late")
    if "key_create" in f: problems.append(f["key_create"])
    if rv.get("cli_rc") != 0: problems.append("keys revoke failed")
    if rv.get("to_401_ms") is None: problems.append("revoked key never refused")
    elif rv["to_401_ms"] > 1000: problems.append(f"revoked key read for {rv['to_401_ms']} ms")
    if rv.get("post_after") != 401: problems.append("POST with a revoked key not refused")
    if f["exit_codes"] != "0 0": problems.append("exit codes")
    if sum(lg.get("tollgate", {}).values()): problems.append("warnings/errors in tollgate's logs")
    if sum(lg.get("pgbouncer", {}).values()): problems.append("warnings/errors in PgBouncer's log")
    return problems

A, B = load("A"), load("B")
ca, cb = cells(A), cells(B)
print()
print(f"tollgate behind PgBouncer {pgb}: pool_mode = transaction, default_pool_size = {pool}, "
      f"{prepared}, ignore_startup_parameters = extra_float_digits")
print(f"server.key_cache_ms = {key_cache}, server.stream_fallback_poll_ms = {fallback}; "
      f"{jobs} background jobs of mock-1; stream of mock-slow (20 deltas, 100 ms apart)")
print()
row("", "A: with DATABASE_DIRECT_URL", "B: without it")
for label, key in [
    ("missing database, two `migrate` at once", "create"),
    ("empty database, two `migrate` at once", "migrate"),
    ("ready (/readyz)", "ready"),
    ("advisory locks held once started", "locks"),
    ("key", "key"),
    ("jobs admitted", "admitted"),
    ("jobs terminal (API)", "terminal"),
    ("SQL: jobs / not completed / in_flight / unsent", "sql"),
    ("SQL: jobs by status", "by_status"),
    ("stream: completed event after job's end", "stream"),
    ("stream: longest gap between events", "gap"),
    ("revoked key: first 401 on a read", "revoke"),
    ("revoke took", "revoke_cli"),
    ("POST with the revoked key", "post_after"),
    ("PgBouncer: most clients / servers", "pools"),
    ("PgBouncer: transactions / queries / wait", "stats"),
    ("exit codes on SIGTERM", "exit"),
    ("tollgate WARN/ERROR lines", "tg_lines"),
    ("PgBouncer WARNING/ERROR lines", "pgb_lines"),
]:
    row(label, ca[key], cb[key])
for letter, f in (("A", A), ("B", B)):
    lg = f["logs"]
    print(f"\n  {letter}: log lines by kind")
    kinds = list(lg.get("tollgate", {}).items()) + [(f"pgbouncer: {k}", v) for k, v in lg.get("pgbouncer", {}).items()]
    for k, v in sorted(kinds, key=lambda kv: -kv[1]):
        print(f"    {v:>5}  {k}")
    if not kinds:
        print("        none")
    closing = lg.get("pgbouncer_closing", {})
    if closing:
        print("    PgBouncer connection closes (LOG): " +
              ", ".join(f"{k} ×{v}" for k, v in sorted(closing.items(), key=lambda kv: -kv[1])))
    hits = {k: v for k, v in lg.get("patterns", {}).items() if v}
    if hits:
        print("    lines mentioning: " + ", ".join(f"'{k}' ×{v}" for k, v in hits.items()))
problems = clean(A, ca)
print()
print(f"build {build_secs} s; whole run {total} s")
if problems:
    print("scenario A is NOT clean: " + "; ".join(problems))
    sys.exit(1)
print("scenario A is clean")
PY
summary_rc=$?
exit "$summary_rc"
