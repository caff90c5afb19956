#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice) for jaxad: create, install this checkout, run, delete.
#
#   launch/tpu_vm.sh create  --name NAME --zone ZONE [--type v4-32] [--version RUNTIME] [--project P] [--spot]
#   launch/tpu_vm.sh install --name NAME --zone ZONE      # this checkout (git HEAD) on every worker + jax[tpu]
#   launch/tpu_vm.sh run     --name NAME --zone ZONE -- --config configs/sivt.py:paper --workdir /mnt/runs/x [--config.k=v ...]
#   launch/tpu_vm.sh delete  --name NAME --zone ZONE
#
# `run` starts `python -m jaxad.main --distributed ...` on all workers at once (ssh --worker=all); JAX finds
# the pod's coordinator, process count and index itself. The workdir must be one shared path on every
# worker (Filestore/NFS, or a gcsfuse mount at the same path): Orbax writes it from all processes.
# --dry-run (anywhere on the command line) prints the commands instead of running them; it needs no gcloud.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

action="${1:-}"; [[ -n "$action" ]] || usage 1; shift
name=""; zone=""; type="v4-8"; version="tpu-ubuntu2204-base"; project=""; spot=0; dry_run=0; args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; for a in "$@"; do [[ "$a" == --dry-run ]] && dry_run=1 || args+=("$a"); done; break ;;
    *) echo "tpu_vm.sh: unknown option $1" >&2; usage 1 ;;
  esac
done
[[ -n "$name" && -n "$zone" ]] || { echo "tpu_vm.sh: --name and --zone are required" >&2; exit 1; }

run() {  # Print (dry run) or execute one command.
  if (( dry_run )); then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}

tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone"); [[ -n "$project" ]] && where+=(--project="$project")
repo="$(cd "$(dirname "$0")/.." && pwd)"

case "$action" in
  create)
    extra=(); (( spot )) && extra+=(--spot)
    run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --version="$version" "${extra[@]}"
    ;;
  install)
    tarball="/tmp/jaxad-src.tar.gz"
    run git -C "$repo" archive --format=tar.gz --output="$tarball" HEAD
    run "${tpu[@]}" scp "$tarball" "$name:jaxad-src.tar.gz" "${where[@]}" --worker=all
    run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="mkdir -p ~/jaxad && tar -xzf ~/jaxad-src.tar.gz -C ~/jaxad && pip install -U 'jax[tpu]' -e ~/jaxad"
    ;;
  run)
    [[ ${#args[@]} -gt 0 ]] || { echo "tpu_vm.sh run: pass jaxad.main arguments after --" >&2; exit 1; }
    cmd="cd ~/jaxad && python -m jaxad.main --distributed"
    for a in "${args[@]}"; do cmd+=" $(printf '%q' "$a")"; done
    status=0
    run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$cmd" || status=$?
    if (( status == 75 )); then  # jaxad.PREEMPTED_EXIT_CODE: stopped by a signal, checkpoint saved.
      echo "tpu_vm.sh: preempted: rerun to resume (the same run command continues from the checkpoint)" >&2
    fi
    exit "$status"
    ;;
  delete)
    run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
    ;;
  *) echo "tpu_vm.sh: unknown action $action (create|install|run|delete)" >&2; usage 1 ;;
esac
