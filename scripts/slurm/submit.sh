#!/usr/bin/env bash
# Submits a decimamba sweep as a Slurm job array of N shards, then a merge that waits for
# every shard to succeed (afterok):
#   bash scripts/slurm/submit.sh N <passkey|eval-ppl|find-layer> [flags…]
# Shard folders and the merged run go to $RUNS (default runs/slurm-<timestamp>). A shard
# that fails can be resubmitted alone (sbatch --array=K …): it resumes its folder; then
# rerun the merge job.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 N <passkey|eval-ppl|find-layer> [flags…]" >&2
    exit 2
fi
N=$1
shift
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive number of shards, not '$N'" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
export SHARDS=$N RUNS=${RUNS:-$PWD/runs/slurm-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$RUNS"
array=$(sbatch --parsable --export=ALL --array=0-$((N - 1)) "$here/sweep-array.sbatch" "$@")
merge=$(sbatch --parsable --export=ALL --dependency=afterok:"$array" "$here/merge.sbatch")
echo "array job $array ($N shards) → merge job $merge; results in $RUNS/merged"
