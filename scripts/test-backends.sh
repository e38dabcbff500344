#!/usr/bin/env bash
# The core suites again on the real scale-out backends: PostgreSQL for the database,
# Redis for the event log (REDIS_URL makes it the default), the cache (rate-limit
# counters) and the Channels layer.
set -euo pipefail
PG_URL=${TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
REDIS=${TEST_REDIS_URL:-redis://127.0.0.1:6379/15}
if ! .venv/bin/python - "$PG_URL" "$REDIS" <<'PY'
import sys, psycopg, redis
psycopg.connect(sys.argv[1].replace("postgres://", "postgresql://"), connect_timeout=3).close()
redis.Redis.from_url(sys.argv[2], socket_connect_timeout=3).ping()
PY
then
  if [ "${CI:-}" = "true" ]; then
    echo "PostgreSQL or Redis is not reachable ($PG_URL, $REDIS)" >&2
    exit 1
  fi
  echo "Skipping the PostgreSQL/Redis pass: start both servers (see README) to run it."
  exit 0
fi
echo "Running the core suites on PostgreSQL and Redis..."
DATABASE_URL="$PG_URL" REDIS_URL="$REDIS" .venv/bin/python -m pytest -q \
  tests/test_api_chat.py tests/test_streaming.py tests/test_websocket.py tests/test_limits_and_usage.py \
  tests/test_auth_and_metrics.py tests/test_continue.py tests/test_eventlog.py tests/test_scaleout.py tests/test_faults.py tests/test_faults_cluster.py tests/test_rows.py
