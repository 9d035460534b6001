#!/usr/bin/env bash
# Stop what scripts/serve.sh started (worker, then server, each with its process group).
set -uo pipefail

cd "$(dirname "$0")/.."
STATE="${ITERABRE_SERVE_STATE:-$PWD/.prefect/serve}"
stopped=0
for name in worker server; do
  pidfile="$STATE/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    stopped=$((stopped + 1))
  fi
  rm -f "$pidfile"
done
rm -f "$STATE/api-url"
echo "stopped $stopped process group(s) started by serve.sh"
