#!/usr/bin/env bash
# Start a local Prefect server + process worker and apply the deployments in prefect.yaml.
#
#   scripts/serve.sh            # or: make serve        (scripts/serve-stop.sh / make serve-stop stops them)
#   PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run iterabre/compress -p target_layers=26
#
# The server URL is passed to the processes started here through their environment only: the
# user's Prefect profile is left untouched, so after `serve-stop` every `iterabre compress`
# goes back to its own in-process API instead of a dead server. Pids and logs: .prefect/serve/.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
PORT="${PREFECT_PORT:-4200}"
POOL="${ITERABRE_POOL:-iterabre-pool}"
STATE="${ITERABRE_SERVE_STATE:-$ROOT/.prefect/serve}"  # pids, logs
PATH="$ROOT/.venv/bin:$PATH"
mkdir -p "$STATE"

if [ -f "$STATE/server.pid" ] && kill -0 "$(cat "$STATE/server.pid")" 2>/dev/null; then
  echo "error: a server started here is already running (pid $(cat "$STATE/server.pid")). Fix: make serve-stop first" >&2
  exit 2
fi

export PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow.db}"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"

# setsid: each background process leads its own process group, so serve-stop can end it with its children.
setsid prefect server start --host 127.0.0.1 --port "$PORT" >"$STATE/server.log" 2>&1 &
echo $! >"$STATE/server.pid"
echo "waiting for the Prefect server on $PREFECT_API_URL ..."
healthy() { python -c "import urllib.request as u; u.urlopen('$PREFECT_API_URL/health', timeout=2)" 2>/dev/null; }
for _ in $(seq 1 180); do healthy && break; sleep 1; done
healthy || { echo "error: the Prefect server did not start in 180 s; see $STATE/server.log. Fix: check that port $PORT is free (PREFECT_PORT=... picks another)" >&2; scripts/serve-stop.sh >/dev/null; exit 1; }

prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process >/dev/null
prefect --no-prompt deploy --all >"$STATE/deploy.log" 2>&1 || { echo "error: prefect deploy failed; see $STATE/deploy.log" >&2; exit 1; }

setsid prefect worker start --pool "$POOL" >"$STATE/worker.log" 2>&1 &
echo $! >"$STATE/worker.pid"
echo "$PREFECT_API_URL" >"$STATE/api-url"

cat <<MSG
Prefect UI:   http://127.0.0.1:$PORT   (logs: $STATE/*.log)
MLflow UI:    mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI
Run a job:    PREFECT_API_URL=$PREFECT_API_URL .venv/bin/prefect deployment run iterabre/compress -p target_layers=26 --watch
Stop:         make serve-stop
MSG
