#!/usr/bin/env bash
# One prepared check of the trainer's speed on a lent GPU (an H100), within about 8 minutes:
#   1. a torch.profiler trace of one step of each mode (kernels per step, fraction of the time the GPU is busy):
#      benchmarks/gpu_check.py profile;
#   2. benchmarks/train_throughput.py --repeats times (default 3) for (a) the reference loop, (b) the paper
#      profile, lean and graph-captured, (c) the fast profile, (d) all 12 chains of a step in flight (streams,
#      batched);
#   3. their medians, ratios and the aims: benchmarks/gpu_check.py summarize -> OUT/gpu_check.json.
# Needs only torch, torchvision, numpy, scipy, matplotlib, tqdm (no network, no papermill). CIFAR-10 comes from
# the JPEG tarball, unpacked once into DATA_ROOT (data/ is git-ignored).
#
#   bash benchmarks/gpu_check.sh [--tarball PATH] [--data-root DIR] [--out DIR] [--repeats N] [--device DEV]
#                                [--dry-run]
# --dry-run: tiny sizes (a step or two, 2 models in flight, no fast-profile throughput run) on whatever device
# is given (default cpu): the CPU test of the Python parts. Relative paths are taken from the repository root.
set -euo pipefail

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
}

TARBALL="${SDLIB_CIFAR_TARBALL:-shared/data/cifar10-jpeg.tar.xz}"
DATA_ROOT="data/cifar10"
OUT="runs/gpu_check"
REPEATS=3
DEVICE=""
DRY_RUN=0
PYTHON="${PYTHON:-python}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --tarball) TARBALL="${2:?--tarball needs a path}"; shift 2 ;;
        --data-root) DATA_ROOT="${2:?--data-root needs a folder}"; shift 2 ;;
        --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
        --repeats) REPEATS="${2:?--repeats needs a number}"; shift 2 ;;
        --device) DEVICE="${2:?--device needs a name}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
if ! [[ "$REPEATS" =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_check.sh: --repeats must be an integer >= 1, got '$REPEATS'" >&2
    exit 2
fi

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SDLIB_GIT_COMMIT="${SDLIB_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}"

if [[ ! -d "$DATA_ROOT/train" || ! -d "$DATA_ROOT/test" ]]; then
    if [[ ! -f "$TARBALL" ]]; then
        echo "gpu_check.sh: no CIFAR-10 under $DATA_ROOT and no tarball at $TARBALL (--tarball)" >&2
        exit 2
    fi
    echo "unpacking $TARBALL into $DATA_ROOT"
    mkdir -p "$DATA_ROOT"
    tar -xJf "$TARBALL" -C "$DATA_ROOT"
fi
mkdir -p "$OUT"

if [[ $DRY_RUN -eq 1 ]]; then
    DEVICE="${DEVICE:-cpu}"
    PROFILE_ARGS=(--chains 2 --batch-size 4 --warmup 1 --steps 1)
    # (fast: batch 256 even here, too slow for a CPU test; its path is paper's, and the profile covers it)
    THROUGHPUT_ARGS=(--variants reference,paper,streams,batched --n-val 100 --reference-iters 2 --paper-iters 2
                     --inflight-iters 2 --warmup 1 --chains 2 --batch-size 4 --workers 0 --eval-images 20)
else
    DEVICE="${DEVICE:-cuda}"
    PROFILE_ARGS=(--chains 12)
    THROUGHPUT_ARGS=(--variants reference,paper,fast,streams,batched --reference-iters 150
                     --paper-iters 200 --fast-iters 40 --inflight-iters 60 --chains 12 --eval-images 2000)
fi

start=$SECONDS
"$PYTHON" benchmarks/gpu_check.py profile --device "$DEVICE" --out "$OUT/profile.json" "${PROFILE_ARGS[@]}"
echo "profile: $((SECONDS - start)) s"
runs=()
for i in $(seq 1 "$REPEATS"); do
    "$PYTHON" benchmarks/train_throughput.py --data-root "$DATA_ROOT" --device "$DEVICE" \
        --out "$OUT/throughput_$i.json" "${THROUGHPUT_ARGS[@]}"
    runs+=("$OUT/throughput_$i.json")
    echo "throughput run $i: $((SECONDS - start)) s"
done
"$PYTHON" benchmarks/gpu_check.py summarize "${runs[@]}" --profile "$OUT/profile.json" --out "$OUT/gpu_check.json"
echo "gpu_check: done in $((SECONDS - start)) s; results in $OUT/gpu_check.json"
