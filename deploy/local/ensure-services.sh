#!/usr/bin/env bash
# Make sure the local RabbitMQ (and PostgreSQL, when asked) answer; start installed ones that are
# stopped; otherwise say exactly how to get them. Used by `make run` and `make test`.
set -euo pipefail

want_postgres=0
[ "${1:-}" = "--postgres" ] && want_postgres=1

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 1; done
  return 1
}

if ! port_open 5672; then
  if command -v rabbitmq-server >/dev/null 2>&1; then
    echo "RabbitMQ is stopped: starting it (rabbitmq-server -detached)"
    rabbitmq-server -detached
    wait_port 5672 || { echo "RabbitMQ did not open port 5672 within 60 s" >&2; exit 1; }
  else
    cat >&2 <<'MSG'
RabbitMQ is not running on 127.0.0.1:5672 and is not installed.
Install and start it, then run this again:
  Debian/Ubuntu: sudo apt-get install rabbitmq-server && sudo rabbitmq-server -detached
  macOS:         brew install rabbitmq && brew services start rabbitmq
  any Docker:    docker run -d -p 5672:5672 rabbitmq:3-management
MSG
    exit 1
  fi
fi

if [ "$want_postgres" = 1 ] && ! port_open 5432; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "PostgreSQL is stopped: starting it"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
    wait_port 5432 || { echo "PostgreSQL did not open port 5432 within 60 s" >&2; exit 1; }
  else
    echo "PostgreSQL is not running on 127.0.0.1:5432; connected tests need it (trust auth, user postgres)." >&2
    exit 1
  fi
fi
