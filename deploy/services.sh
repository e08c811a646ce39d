#!/usr/bin/env bash
# Makes sure the local PostgreSQL and RabbitMQ that tollgate uses are running: starts them if
# installed, installs them from the distribution's packages if not. Also makes sure python3 with
# venv is there for the OpenAI SDK test.
#
# Idempotent: run it as often as you like. It exits 0 only once PostgreSQL accepts connections on
# 127.0.0.1:5432 and RabbitMQ on 127.0.0.1:5672 (what tollgate.toml's defaults point at), and 1 if
# either does not come up in time. One status line per service goes to stderr.
#
# Assumes a Debian-like system (apt-get, pg_ctlcluster). Runs privileged commands through sudo
# when not run as root.
set -euo pipefail

PG_WAIT=60      # seconds to wait for PostgreSQL to accept connections
RABBIT_WAIT=90  # seconds to wait for RabbitMQ's AMQP port

log() { echo "$*" >&2; }

# Runs a command as root: directly if we are root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    else
        sudo "$@"
    fi
}

# Installs Debian packages quietly (apt's chatter goes to stderr, like everything else here).
apt_install() {
    as_root apt-get update >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" >&2
}

# True if something accepts TCP connections on 127.0.0.1:$1 (bash's /dev/tcp, 2 s at most).
tcp_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------

pg_ready() {
    if command -v pg_isready >/dev/null; then
        pg_isready -q -h 127.0.0.1 -p 5432
    else
        tcp_open 5432
    fi
}

# Newest installed PostgreSQL major version (a directory under /etc/postgresql), or empty.
pg_version() {
    ls /etc/postgresql 2>/dev/null | sort -V | tail -1 || true
}

pg_start() {
    local version
    version=$(pg_version)
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 \
        || as_root service postgresql start >&2 \
        || log "postgres: start command failed; waiting anyway"
}

# Lets the postgres user connect over TCP from localhost without a password: trust lines at the
# top of pg_hba.conf (the first matching line wins). Only done for a cluster this script installed.
pg_trust_localhost() {
    local hba
    hba="/etc/postgresql/$(pg_version)/main/pg_hba.conf"
    if ! as_root grep -q 'added by tollgate deploy/services.sh' "$hba"; then
        as_root sed -i '1i\
# added by tollgate deploy/services.sh: passwordless TCP from localhost\
host    all             postgres        127.0.0.1/32            trust\
host    all             postgres        ::1/128                 trust' "$hba"
    fi
}

# wait_for CHECK SECONDS MESSAGE HINT: waits until CHECK succeeds, or exits 1 saying MESSAGE and
# HINT after SECONDS.
wait_for() {
    local check=$1 limit=$2 message=$3 hint=$4
    local deadline=$((SECONDS + limit))
    until "$check"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "error: $message within ${limit}s; $hint"
            exit 1
        fi
        sleep 1
    done
}

pg_wait() {
    wait_for pg_ready "$PG_WAIT" "postgres did not accept connections on 127.0.0.1:5432" \
        "see the logs in /var/log/postgresql"
}

ensure_postgres() {
    if pg_ready; then
        log "postgres: running"
    elif [ -n "$(pg_version)" ]; then
        pg_start
        pg_wait
        log "postgres: started"
    else
        apt_install postgresql
        pg_trust_localhost
        # The package may have started the cluster itself (not in containers, where policy-rc.d
        # forbids it): then reload it to pick up pg_hba.conf, otherwise start it.
        if pg_ready; then
            as_root pg_ctlcluster --skip-systemctl-redirect "$(pg_version)" main reload >&2
        else
            pg_start
        fi
        pg_wait
        log "postgres: installed and started"
    fi
}

# ---------------------------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------------------------

# Ready = the AMQP port answers and, if the CLI tools are there, the node says it is running.
rabbit_ready() {
    tcp_open 5672 || return 1
    if command -v rabbitmq-diagnostics >/dev/null; then
        as_root rabbitmq-diagnostics -q check_running >/dev/null 2>&1
    fi
}

# True if the node is up, even if it has not opened the AMQP port yet (it does so late in boot).
rabbit_node_up() {
    command -v rabbitmq-diagnostics >/dev/null \
        && as_root rabbitmq-diagnostics -q ping >/dev/null 2>&1
}

rabbit_start() {
    # Starting a second node with the same name fails, so leave a booting node alone.
    if rabbit_node_up; then
        return 0
    fi
    as_root rabbitmq-server -detached >&2 || log "rabbitmq: start command failed; waiting anyway"
}

rabbit_wait() {
    wait_for rabbit_ready "$RABBIT_WAIT" "rabbitmq did not accept connections on 127.0.0.1:5672" \
        "see the logs in /var/log/rabbitmq"
}

ensure_rabbitmq() {
    if rabbit_ready; then
        log "rabbitmq: running"
    elif command -v rabbitmq-server >/dev/null; then
        rabbit_start
        rabbit_wait
        log "rabbitmq: started"
    else
        apt_install rabbitmq-server
        rabbit_start
        rabbit_wait
        log "rabbitmq: installed and started"
    fi
}

# ---------------------------------------------------------------------------------------------
# Python, for the test that runs the official OpenAI SDK (it makes its own virtualenv)
# ---------------------------------------------------------------------------------------------

ensure_python() {
    if command -v python3 >/dev/null && python3 -m venv --help >/dev/null 2>&1; then
        log "python3: present"
    else
        apt_install python3 python3-venv
        log "python3: installed"
    fi
}

ensure_postgres
ensure_rabbitmq
ensure_python
