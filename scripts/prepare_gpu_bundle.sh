#!/usr/bin/env bash
# Build, in a fresh checkout, the git-ignored bundle that scripts/gpu_session.sh reads on the GPU machine
# (development tooling, not part of the product). Run from anywhere on this machine, before the lease:
#   scripts/prepare_gpu_bundle.sh                 wheels, stub, registered `default` weights, the 512 x 512 CT
#   CACHE_MB=36 scripts/prepare_gpu_bundle.sh     the same plus up to 36 MB of train-split cache entries
#                                                 (only needed when gpu_session.sh trains: TRAIN_UNTIL > 0)
#   PART_MB=50 scripts/prepare_gpu_bundle.sh      also the rest of the train split, in folders .gpu-data/partN of
#                                                 up to 50 MB, one for each upload call (gpu_session.sh, top)
# Environment: MODEL (weights to start from: a registered name or a .safetensors path, default `default`),
# DATA_ROOT (the shared CT folder, default ../shared/data/ct). A device call carries at most 64 MiB in all,
# tree included: the script prints the total and fails above it. Pass carry [".gpu", ".whl"].
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
DATA_ROOT="${DATA_ROOT:-$REPO/../shared/data/ct}"
MODEL="${MODEL:-default}"
CACHE_MB="${CACHE_MB:-0}"
PART_MB="${PART_MB:-0}"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
grep -qx '/.gpu-data/' .git/info/exclude 2>/dev/null || echo '/.gpu-data/' >> .git/info/exclude

# The GPU image has torch but no MONAI or nibabel (SimpleITK is left behind: ~52 MB, and nothing there reads scans).
[ -n "$(ls .whl/monai-*.whl 2>/dev/null)" ] || bash "$REPO/../shared/tools/device-wheels.sh" >/dev/null

mkdir -p .gpu/stub .gpu/model
: > .gpu/stub/SimpleITK.py  # imported at module level by the library; never called on the cache/npz paths
python - "$MODEL" <<'EOF'
import shutil, sys
from pathlib import Path
from MedDiffFMLib.checkpoints import resolve_model
weights = Path(resolve_model(sys.argv[1]))
for suffix in (".safetensors", ".json"):
    shutil.copyfile(weights.with_suffix(suffix), Path(".gpu/model") / ("ema" + suffix))
print("weights:", weights)
EOF
[ -f .gpu/crlm.npz ] || python benchmarks/denoise_speed.py --save-input .gpu/crlm.npz \
    --input "$DATA_ROOT/mirp_crlm/CRLM-CT-1004/image/"

rm -rf .gpu/cache .gpu-data
if [ "$CACHE_MB" -gt 0 ] || [ "$PART_MB" -gt 0 ]; then
  # Fill a full cache of the train split once, then take its entries round-robin over the cases (each case's
  # training grids in turn): up to CACHE_MB into .gpu/cache, skipping any that would pass it, so that every case
  # that fits travels; with PART_MB, all the others into upload parts .gpu-data/partN of at most PART_MB each.
  mkdir -p .gpu/cache
  python - "$DATA_ROOT" /tmp/meddifffm-gpu-cache "$CACHE_MB" "$PART_MB" <<'EOF'
import itertools, shutil, sys
from pathlib import Path
from MedDiffFMLib.config import preset
from MedDiffFMLib.dataset import CTPatchDataset, split_cases
data = CTPatchDataset(split_cases(sys.argv[1], "train"), preset("default"), sys.argv[2])
cache_budget, part_budget = int(sys.argv[3]) * 2**20, int(sys.argv[4]) * 2**20
used, kept, part, part_used = 0, 0, 0, None
for path in itertools.chain(*itertools.zip_longest(*data.entries)):
    if path is None:
        continue
    size = path.stat().st_size
    if used + size <= cache_budget:
        shutil.copy(path, ".gpu/cache/")
        used, kept = used + size, kept + 1
    elif part_budget:
        if part_used is None or part_used + size > part_budget:
            part, part_used = part + 1, 0
            Path(f".gpu-data/part{part}").mkdir(parents=True)
        shutil.copy(path, f".gpu-data/part{part}/")
        part_used += size
print(f"cache: {kept} of {sum(map(len, data.entries))} entries ({used / 2**20:.1f} MB) in .gpu/cache; "
      f"{part} upload parts in .gpu-data")
EOF
fi
tree=$(git ls-files -z | xargs -0 cat | wc -c)
bundle=$(cat $(find .gpu .whl -type f) | wc -c)
total_mib=$(( (tree + bundle) / 1048576 ))
echo "travels: tree $(( tree / 1048576 )) MiB + bundle $(( bundle / 1048576 )) MiB = $total_mib MiB (limit 64)"
[ "$total_mib" -lt 64 ] || { echo "too large for one device call: lower CACHE_MB" >&2; exit 1; }
for part in $(find .gpu-data -mindepth 1 -maxdepth 1 -type d 2>/dev/null); do  # each travels alone, with the tree
  [ $(( (tree + $(cat "$part"/* | wc -c)) / 1048576 )) -lt 64 ] || { echo "$part too large: lower PART_MB" >&2; exit 1; }
done
echo "bundle ready: device run with carry [\".gpu\", \".whl\"] and command 'bash scripts/gpu_session.sh'"
