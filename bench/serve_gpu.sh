#!/usr/bin/env bash
# The serving benchmark on one CUDA GPU (issue 29), in under 8 minutes on an H100/H200:
#   1. train the benchmark's B = 3 model with exit losses (cpu-shared-scales, 400 steps) on the GPU;
#   2. `loopgolf bench serve --device cuda` on it: static, sequence and depth-wise engines, an
#      adaptive criterion (maxprob:0.1) under both exit-state schemes and `agree`, two stream sizes.
# Every result goes to $OUT (default ./bench-out): the run's summary, one JSON line per bench, the log.
#
# The GPU image has torch but not loopgolf's small pure dependencies (brotli, zstandard). Where
# none can be downloaded there, bring them as wheels first, from the repository root here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.11 \
#       --platform manylinux2014_x86_64 -d .whl brotli zstandard
# and carry `.whl` (the script installs whatever wheels it finds there).
# Run from the repository root:  bash bench/serve_gpu.sh
# A dry run of the script's steps on CPU (a small model, one round): DEVICE=cpu STEPS=20 REPEATS=1 bash bench/serve_gpu.sh
set -euo pipefail
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-400}"
REPEATS="${REPEATS:-3}"
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/serve_gpu.log") 2>&1

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-deps .whl/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DEVICE" = cuda ]; then
    python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name(0))"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

RUN="$OUT/b3-run"
rm -rf "$RUN"
SECONDS=0
python3 -m loopgolf run --preset cpu-shared-scales --exit-loss-weight 0.3 --steps "$STEPS" --device "$DEVICE" \
    --out "$RUN" --quiet --json > "$OUT/run.json"
echo "trained in ${SECONDS}s"

bench() {  # bench NAME ARGS...: one JSON line per bench in $OUT/NAME.json
    local name="$1"
    shift
    SECONDS=0
    python3 -m loopgolf bench serve "$RUN" --device "$DEVICE" --server-requests 0 --repeats "$REPEATS" --json "$@" > "$OUT/$name.txt"
    head -n -1 "$OUT/$name.txt"
    tail -n 1 "$OUT/$name.txt" > "$OUT/$name.json"
    echo "($name: ${SECONDS}s)"
}
# The CPU benchmark's stream (64 requests, 32 slots), then a GPU-sized one (256 requests, 128 slots).
bench maxprob-share-64 --requests 64 --slots 32 --early-exit maxprob:0.1 --exit-state share
bench maxprob-fill-64 --requests 64 --slots 32 --early-exit maxprob:0.1 --exit-state fill
bench agree-share-64 --requests 64 --slots 32 --early-exit agree --exit-state share
bench maxprob-share-256 --requests 256 --slots 128 --early-exit maxprob:0.1 --exit-state share --eval-tokens 32768
echo "done in $(( $(date +%s) - $(stat -c %Y "$OUT/run.json") ))s after training"
