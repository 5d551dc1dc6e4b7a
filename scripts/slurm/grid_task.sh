#!/usr/bin/env bash
# One task of a grid: the SLURM_ARRAY_TASK_ID-th entry of GRID, run with `bench run` into its
# own folder OUT_DIR/<name>. A task whose run.json already says "complete": true is skipped,
# so re-submitting the whole array after a preemption or a failure re-runs only what is missing
# (a half-done task resumes its embedding extraction from the cache).
#
#   SLURM_ARRAY_TASK_ID=2 scripts/slurm/grid_task.sh CONFIG GRID [key=value ...]
#
# GRID: one entry per line, "BACKBONE TASK [DATASET]"; blank lines and lines starting with #
# are not entries (entry N is the N-th other line). The run is named TASK-BACKBONE[-DATASET]
# with every character other than letters, digits, '.', '_' and '-' replaced by '_'.
# Environment: BENCH_OUT_DIR (default runs), BENCH_PYTHON (default python), BENCH_LAUNCH
# (default srun inside a SLURM job, nothing outside one).
set -euo pipefail
CONFIG=${1:?usage: grid_task.sh CONFIG GRID [key=value ...]}
GRID=${2:?usage: grid_task.sh CONFIG GRID [key=value ...]}
shift 2
ID=${SLURM_ARRAY_TASK_ID:?SLURM_ARRAY_TASK_ID is not set: run this as a job array task, or set it by hand}
OUT_DIR=${BENCH_OUT_DIR:-runs}
PYTHON=${BENCH_PYTHON:-python}

[ -f "$CONFIG" ] || { echo "grid_task: config $CONFIG does not exist" >&2; exit 2; }
[ -f "$GRID" ] || { echo "grid_task: grid file $GRID does not exist" >&2; exit 2; }
ENTRY=$(grep -v -E '^[[:space:]]*(#|$)' "$GRID" | sed -n "${ID}p" || true)
if [ -z "$ENTRY" ]; then
  COUNT=$(grep -c -v -E '^[[:space:]]*(#|$)' "$GRID" || true)
  echo "grid_task: $GRID has $COUNT entries, there is no entry $ID (submit with --array=1-$COUNT)" >&2
  exit 2
fi
read -r BACKBONE TASK DATASET EXTRA <<<"$ENTRY"
if [ -z "${TASK:-}" ] || [ -n "${EXTRA:-}" ]; then
  echo "grid_task: entry $ID of $GRID is '$ENTRY'; write BACKBONE TASK [DATASET]" >&2
  exit 2
fi
STEM=$(basename "$TASK" .yaml)
NAME="${STEM}-${BACKBONE}${DATASET:+-$DATASET}"
NAME=$(printf '%s' "$NAME" | tr -c 'A-Za-z0-9._-' '_')
RECORD="$OUT_DIR/$NAME/run.json"

if [ -f "$RECORD" ] && "$PYTHON" - "$RECORD" <<'PY'
import json, sys
try:
    sys.exit(0 if json.load(open(sys.argv[1])).get("complete") is True else 1)
except (OSError, ValueError):
    sys.exit(1)
PY
then
  echo "grid_task: entry $ID ($NAME) is complete in $OUT_DIR/$NAME: skipped"
  exit 0
fi

LAUNCH=${BENCH_LAUNCH-}
if [ -z "${BENCH_LAUNCH+x}" ] && [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null 2>&1; then
  LAUNCH=srun
fi
echo "grid_task: entry $ID: $BACKBONE on $TASK${DATASET:+ ($DATASET)} -> $OUT_DIR/$NAME"
ARGS=(-m bench.cli run -c "$CONFIG" "backbone.name=$BACKBONE" "task=$TASK" "name=$NAME" "out_dir=$OUT_DIR")
[ -n "${DATASET:-}" ] && ARGS+=("dataset.name=$DATASET")
exec $LAUNCH "$PYTHON" "${ARGS[@]}" "$@"
