#!/usr/bin/env bash
# Start a local Prefect server + process worker and apply the deployments in prefect.yaml.
#
#   scripts/serve.sh            # or: make serve
#   prefect deployment run iterabre/compress -p model=smollm2-135m -p target_layers=26
#
# Everything runs in the background; pids and logs go to .prefect/serve/ (git-ignored).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
PORT="${PREFECT_PORT:-4200}"
POOL="${ITERABRE_POOL:-iterabre-pool}"
STATE="$ROOT/.prefect/serve"
PATH="$ROOT/.venv/bin:$PATH"
mkdir -p "$STATE"

export PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow.db}"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"

prefect server start --host 127.0.0.1 --port "$PORT" >"$STATE/server.log" 2>&1 &
echo $! >"$STATE/server.pid"
echo "waiting for the Prefect server on $PREFECT_API_URL ..."
healthy() { python -c "import urllib.request as u; u.urlopen('$PREFECT_API_URL/health', timeout=2)" 2>/dev/null; }
for _ in $(seq 1 120); do healthy && break; sleep 1; done
healthy || { echo "server did not start; see $STATE/server.log"; exit 1; }

prefect config set PREFECT_API_URL="$PREFECT_API_URL" >/dev/null
prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process
prefect --no-prompt deploy --all

prefect worker start --pool "$POOL" >"$STATE/worker.log" 2>&1 &
echo $! >"$STATE/worker.pid"

cat <<MSG
Prefect UI:   http://127.0.0.1:$PORT   (logs: $STATE/*.log)
MLflow UI:    mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI
Run a job:    prefect deployment run iterabre/compress -p model=smollm2-135m -p target_layers=26
Stop:         kill \$(cat $STATE/worker.pid) \$(cat $STATE/server.pid)
MSG
