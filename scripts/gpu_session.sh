#!/bin/bash
# One short GPU session (development tooling, not part of the product): the network's throughput (NET_SETS),
# the denoise-speed table (BENCH_SETS), then training (TRAIN_MODEL: `default` unless told) from cache entries
# until TRAIN_UNTIL seconds
# after the start (skipped when less than a minute is left for it), stopped cleanly
# (SIGTERM -> checkpoint), with the run packed into $OUT in parts under 16 MB.
# Run from the repo root on the GPU machine, with a bundle that scripts/prepare_gpu_bundle.sh builds here
# (git-ignored, < 64 MiB in all):
#   .whl/                   monai + nibabel wheels (../shared/tools/device-wheels.sh)
#   .gpu/stub/SimpleITK.py  an empty module: training from cache entries never reads scans
#   .gpu/cache/*.npz        cache entries of the train split (a subset that fits the transfer limit)
#   .gpu/model/ema.*        the weights to start from
#   .gpu/crlm.npz           python benchmarks/denoise_speed.py --save-input .gpu/crlm.npz --input
#                           ../shared/data/ct/mirp_crlm/CRLM-CT-1004/image/ (11 MB: leave that much of the cache
#                           behind, or all of it when TRAIN_UNTIL is 0); a real 512 x 512 CT, air around the body
# Back here: cat run.tar.part-* | tar xf - in a run folder, then `train --resume` continues it (with PACK_STATE=0:
# `train --init-from <its ema.safetensors>`).
set -u
START=$(date +%s)
NET_UNTIL=${NET_UNTIL:-0}; BENCH_UNTIL=${BENCH_UNTIL:-225}; TRAIN_UNTIL=${TRAIN_UNTIL:-0}
# The network alone (benchmarks/network_speed.py): not run in session 14's second call (NET_UNTIL 0). Left open:
# whether 32 channels at full resolution cost time once compiled (60 s was too short for its compile).
NET_SETS=${NET_SETS-"--channels 32,32,64 --options compile --batch 512 --iters 10"}
# Denoising a real 512 x 512 CT (CRLM-CT-1004 mirror-padded to 300 slices; the windows wholly in air are
# skipped), bf16, 32^3 windows. Session 14, second call, on this session's batch balanced over the evaluated
# windows and threaded set-up: overlap 0.125 compiled, NFE 2 to fill torch's on-disk compile cache, then NFE 100
# warm (a user's second run; the first call measured 69.2 s); then the same warm at NFE 3 under cProfile (where the
# set-up goes), and the user's everyday denoise (noise estimated, NFE 3, eager; 21.8 s in the first call).
M="--model .gpu/model/ema.safetensors --device cuda --size 512 512 300 --precision bf16 --input .gpu/crlm.npz --threads 16"
R="$M --noise-level 80 --compile --window-batch 512 --overlap 0.125"
BENCH_SETS=${BENCH_SETS-"$R --nfe 2;$R --nfe 100;$R --nfe 3 --profile 45;$M --nfe 3 --estimate-noise --overlap 0.25 --window-batch 256"}
# Half of the low-t noise CT-textured: what made `denoise` better than `default` (benchmarks/README.md, session 17).
# Sessions 15, 18 and 19's GPU fine-tunes lost on the chest; session 19 ran the same fine-tune in fp32 and bf16 and
# both lost alike, so bf16 is not why (benchmarks/README.md). Next to vary: the learning rate at batches of 32 (e.g.
# "--lr 2e-5" added to TRAIN_ARGS), or the whole train split uploaded in more parts; score the EMAs with
# benchmarks/denoise_quality.py (lung1 is the case that falls).
TRAIN_ARGS=${TRAIN_ARGS:---batch-size 32 --num-workers 14 --channels-last --low-noise-fraction 0.7 --low-noise-max-t 60 --correlated-noise 0.5}
# What to train: `default` from the carried weights, or e.g. "--config .gpu/wide.json" for a new network from scratch.
TRAIN_MODEL=${TRAIN_MODEL:---preset default --init-from .gpu/model/ema.safetensors}
# PACK_STATE=0 brings back only the EMA weights and the loss log (a larger network's optimizer state would pass the
# 64 MiB that comes back from a call); the run then continues with --init-from, not --resume.
PACK_STATE=${PACK_STATE:-1}
# The folder of cache entries. One call carries at most 64 MiB, tree included; the train split's entries are about
# 290 MB. Session 15 found that a call's .gpu holds only what that call carries (an earlier call's .gpu is gone),
# while /tmp (the wheels' install) stays on a warm machine. So the whole split goes up in parts (PART_MB=50
# scripts/prepare_gpu_bundle.sh), one call each, back to back (the machine goes back after 30 s idle):
#   call k: carry [".gpu-data/partk"], command
#           mkdir -p /tmp/meddifffm-data && cp .gpu-data/partk/*.npz /tmp/meddifffm-data/
#   last:   carry [".gpu", ".whl"], command
#           cp .gpu/cache/*.npz /tmp/meddifffm-data/ 2>/dev/null
#           TRAIN_DATA=/tmp/meddifffm-data TRAIN_UNTIL=... bash scripts/gpu_session.sh
TRAIN_DATA=${TRAIN_DATA:-.gpu/cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
elapsed() { echo $(( $(date +%s) - START )); }
if [ -d .whl ] && [ ! -d /tmp/site/monai ]; then  # a warm machine keeps an earlier call's install
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site:$PWD/.gpu/stub PYTHONUNBUFFERED=1
LOG=$OUT/device.log
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc
  python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())"; } >> "$LOG" 2>&1
# run_sets SCRIPT UNTIL SETS: each ';'-separated argument set of SCRIPT while more than 20 s are left before UNTIL
# (an empty SETS runs nothing). timeout signals the whole process group, the spawned benchmark children too.
run_sets() {
  local script=$1 until=$2 args left
  IFS=';' read -ra SETS <<< "$3"
  for args in "${SETS[@]}"; do
    left=$(( until - $(elapsed) )); [ $left -gt 20 ] || break
    timeout -k 5 $left python3 $script $args >> "$LOG" 2>&1
    echo "$script exit $? at $(elapsed) s" >> "$LOG"
  done
}
echo "== network at $(elapsed) s" >> "$LOG"
run_sets benchmarks/network_speed.py $NET_UNTIL "$NET_SETS"
echo "== bench at $(elapsed) s" >> "$LOG"
run_sets benchmarks/denoise_speed.py $BENCH_UNTIL "$BENCH_SETS"
[ $(( TRAIN_UNTIL - $(elapsed) )) -gt 60 ] || { echo "no time left to train; done at $(elapsed) s" >> "$LOG"; exit 0; }
echo "== train at $(elapsed) s" >> "$LOG"
rm -rf .gpu/run  # a warm machine may hold an earlier call's run: this call packs its own
python3 -m MedDiffFMLib train $TRAIN_MODEL --data "$TRAIN_DATA" --out .gpu/run --cache-dir .gpu/unused \
  --steps 1000000 --seed 1 --checkpoint-minutes 2 --checkpoint-every 100000 \
  --progress none \
  $TRAIN_ARGS >> "$OUT/train.log" 2>&1 &
PID=$!
# SNAPSHOTS > 0 keeps that many of the EMA weights the run writes at its checkpoints (one at most every
# SNAPSHOT_S seconds) as $OUT/ema-<step>.safetensors: checkpoints are chosen on the denoising table, not the loss,
# and the last one is not always the best. Their configuration is the final ema.json's.
SNAPSHOTS=${SNAPSHOTS:-0}; SNAPSHOT_S=${SNAPSHOT_S:-120}; taken=0; last_snap=$(elapsed)
while kill -0 $PID 2>/dev/null && [ $(elapsed) -lt $TRAIN_UNTIL ]; do
  sleep 2
  if [ $taken -lt $SNAPSHOTS ] && [ $(( $(elapsed) - last_snap )) -ge $SNAPSHOT_S ] && [ -f .gpu/run/ema.json ]; then
    step=$(python3 -c "import json; print(json.load(open('.gpu/run/ema.json'))['steps'])" 2>/dev/null)
    if [ -n "$step" ] && [ ! -f "$OUT/ema-$step.safetensors" ]; then
      cp .gpu/run/ema.safetensors "$OUT/ema-$step.safetensors" && taken=$(( taken + 1 )) && last_snap=$(elapsed)
      echo "snapshot of step $step at $(elapsed) s" >> "$LOG"
    fi
  fi
done
kill -TERM $PID 2>/dev/null
for i in $(seq 30); do kill -0 $PID 2>/dev/null || break; sleep 1; done
pkill -9 -P $PID 2>/dev/null; kill -9 $PID 2>/dev/null  # its loader workers, then itself
echo "train stopped at $(elapsed) s" >> "$LOG"
cd .gpu/run 2>/dev/null && {
  state=$(python3 -c "import json; print(json.load(open('last.json'))['state'])" 2>/dev/null)
  ls -la >> "$LOG"; cat last.json >> "$LOG"
  [ "$PACK_STATE" = 1 ] || state=""
  tar cf - last.json loss.csv ema.json ema.safetensors ${state:+$state.json $state.safetensors} | split -b 15M - "$OUT/run.tar.part-"
}
echo "done at $(elapsed) s" >> "$LOG"
