#!/usr/bin/env bash
# Train the `default` preset in the background on this machine's CPU, resumable.
#   scripts/train_default_cpu.sh [extra `train` options]     (run again after a stop: it resumes)
# Environment: MEDDIFFFM_RUN (run folder, default /work/runs/default), MEDDIFFFM_THREADS (default 1:
# on a CPU shared with other jobs one thread ran 3-6x faster than two, which stall in OpenMP barriers).
# Timesteps: 70% below t = 60, where denoising starts (benchmarks/README.md, "Training focused on low noise").
# Stop cleanly with: kill "$(cat "$MEDDIFFFM_RUN/train.pid")"  (at most ~5 minutes of work are lost).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${MEDDIFFFM_RUN:-/work/runs/default}"
THREADS="${MEDDIFFFM_THREADS:-1}"
mkdir -p "$OUT"
cd "$REPO"
if [ -f "$OUT/train.pid" ] && kill -0 "$(cat "$OUT/train.pid")" 2>/dev/null; then
    echo "already training (pid $(cat "$OUT/train.pid")); log: $OUT/train.log" >&2
    exit 1
fi
OMP_NUM_THREADS="$THREADS" nohup nice -n 5 python -m MedDiffFMLib train --preset default --data train \
    --out "$OUT" --cache-dir "$OUT/../cache" --resume --steps 1000000 --batch-size 2 --channels-last \
    --checkpoint-minutes 5 --checkpoint-every 1000 --validate-every 100 --threads "$THREADS" \
    --low-noise-fraction 0.7 --low-noise-max-t 60 --progress none "$@" \
    >> "$OUT/train.log" 2>&1 &
echo $! > "$OUT/train.pid"
echo "training in the background (pid $!); log: $OUT/train.log, EMA model: $OUT/ema.safetensors"
