#!/usr/bin/env bash
# The committed CPU grid of chapter 7 (results/cifar10_cpu): the cpu profile, 3 seeds, 5 steps, alpha 0, 0.25, 0.5,
# 0.75, 1 and the alpha-hat chain, at label noise 0 and 0.4. Six (noise, seed) jobs on two workers (one per noise
# level, seed by seed), each a
# single-threaded process (one per core: on 2 cores two one-thread runs are faster together than one two-thread
# run, and a busy core stalls only one of them). Resumable: run it again and every finished step is skipped, an
# unfinished one resumes from its last epoch. Usage: bash scripts/cpu_grid.sh [DATA_ROOT] [RESULTS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
data_root=${1:-data/cifar10}
results_dir=${2:-results/cifar10_cpu}
mkdir -p runs/cpu_grid
job() {  # noise seed
  OMP_NUM_THREADS=1 .venv/bin/python -m sdlib.train --profile cpu --label-noise "$1" --seeds "$2" \
    --data-root "$data_root" --results-dir "$results_dir" --checkpoint-dir checkpoints/cifar10_cpu --no-progress \
    >> "runs/cpu_grid/noise$1-seed$2.log" 2>&1
}
worker_a() { job 0 0; job 0 1; job 0 2; }  # clean labels
worker_b() { job 0.4 0; job 0.4 1; job 0.4 2; }  # 40 % label noise
worker_a & a=$!
worker_b & b=$!
wait $a; wait $b
