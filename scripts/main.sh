#!/usr/bin/env bash
# The main job: build features, train both models, evaluate, export, index, bundle and register them
# (training), choose the page's retrieval weight and the channel quotas on validation (evaluation), then
# start the MLflow UI and the BentoML service on localhost and send an example request.
#
#   scripts/main.sh [--config FILE] [--set key=value ...]      (make main CONFIG=... SET="--set ...")
#   MAIN_SMOKE=1 scripts/main.sh ...   stops both servers after the example request instead of waiting
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SERVE_PORT=${SERVE_PORT:-3000}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/runs/mlflow.db}
export BENTOML_DO_NOT_TRACK=true
mkdir -p runs

"$PY" -m training fit "$@"
# The registered model and alias the config names (configs/movielens-100k.yaml registers its own), and the
# bundle of the held-out fit (the served one without a refit).
FIT_OUT=$("$PY" - "$@" <<'PY'
import argparse
from pathlib import Path
from features.cli_common import add_config_args, config_from_args
from features.contract import BUNDLE_DIR, HELDOUT_BUNDLE_DIR
from training.config import TrainConfig
ap = argparse.ArgumentParser()
add_config_args(ap)
cfg = config_from_args(ap.parse_known_args()[0], TrainConfig)
t = cfg.tracking
print(f"models:/{t.registered_model}@{t.alias}")
print(Path(cfg.output_dir) / (HELDOUT_BUNDLE_DIR if cfg.training.refit else BUNDLE_DIR))
PY
)
MODEL_URI=$(sed -n 1p <<< "$FIT_OUT")
HELDOUT=$(sed -n 2p <<< "$FIT_OUT")

# Training chose the channel quotas by the recall of the merged candidates; the served ones are chosen by the
# page the user gets on the validation days, written into the bundles and registered as a new version.
echo
echo "retrieval weight and channel quotas by the served page on the validation days (python -m evaluation choose-channels):"
"$PY" -m evaluation choose-channels "$@"

# What the user gets from the merged candidates against each channel alone: the served page on the test
# days, through the service's request path (python -m evaluation channels; MLflow run "evaluate-channels").
echo
echo "served feed by candidate source (test period, $HELDOUT):"
"$PY" -m evaluation channels --bundle "$HELDOUT" --period test --max-users "${MAIN_CHANNEL_USERS:-0}" \
  --out "$(dirname "$HELDOUT")/channels_eval.json"

# The feed policy against engagement-only on the same test days: creator exposure Gini and what it costs in
# NDCG (python -m evaluation policy; MLflow run "evaluate-policy"). The page's retrieval weight chosen above
# also decides how far the exposure boost reaches, so this is re-measured with every choice.
echo
echo "feed policy against engagement-only (test period, $HELDOUT):"
"$PY" -m evaluation policy --bundle "$HELDOUT" --period test --out "$(dirname "$HELDOUT")/policy_eval.json"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$PY" -m mlflow server --backend-store-uri "$MLFLOW_TRACKING_URI" \
  --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 > runs/mlflow-ui.log 2>&1 &
pids+=($!)
"$PY" -m serving --bundle "$MODEL_URI" --port "$SERVE_PORT" > runs/serving.log 2>&1 &
pids+=($!)

for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$SERVE_PORT/readyz" > /dev/null 2>&1 && break
  sleep 1
done
curl -sf "http://127.0.0.1:$SERVE_PORT/readyz" > /dev/null || { echo "service did not become ready; see runs/serving.log"; tail -20 runs/serving.log; exit 1; }

user=$("$PY" - "$MODEL_URI" <<'PY'
import sys, pandas as pd, mlflow
p = mlflow.artifacts.download_artifacts(f"{sys.argv[1]}/features/users.parquet")
u = pd.read_parquet(p, columns=["user_id", "user_id_idx"])
print(u.loc[u["user_id_idx"] > 0, "user_id"].iloc[0])
PY
)
body="{\"user_id\": \"$user\", \"k\": 10}"
cat <<MSG

feedstack is up.
  service   http://127.0.0.1:$SERVE_PORT        (OpenAPI page at /, spec /docs.json, metrics /metrics)
  MLflow UI http://127.0.0.1:$MLFLOW_PORT       (served: $MODEL_URI)

example request:
  curl -s -X POST http://127.0.0.1:$SERVE_PORT/recommend -H 'content-type: application/json' -d '$body'

MSG
curl -s -X POST "http://127.0.0.1:$SERVE_PORT/recommend" -H "content-type: application/json" -d "$body" > runs/example-response.json
"$PY" - <<PY
import json
r = json.load(open("runs/example-response.json"))
for i in r["items"]:
    p = i["predictions"]
    heads = "  ".join(f"{h} {v:.3f}" for h, v in list(p.items())[:3])
    watch = f"  watch {i['watch_time_ms'] / 1000:5.1f}s" if i.get("watch_time_ms") is not None else ""
    print(f"  {i['item_id']:>8}  creator {i['creator_id']:>8}  score {i['score']:6.3f}  {heads}{watch}  {','.join(i['reasons'])}")
print(f"bundle {r['bundle_version']}, {r['candidates']} candidates, cold_start={r['cold_start']}; full JSON in runs/example-response.json")
PY
if [ "${MAIN_SMOKE:-0}" = "1" ]; then exit 0; fi
echo "(Ctrl-C stops both servers)"
wait
