#!/usr/bin/env bash
# A Cloud TPU VM slice (single host or pod): create, install, run the same command on every worker,
# stream logs, delete. jax.distributed reads the slice's topology from the TPU VM environment, so
# no coordinator flags are needed; every worker runs the identical command.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/tpu_pod.sh create|install|run|logs|delete|all [options] [-- extra main flags]

  --name=NAME             TPU VM name (required)
  --zone=ZONE             e.g. us-west4-a (required)
  --project=PROJECT       gcloud project (default: gcloud's)
  --accelerator=TYPE      e.g. v5litepod-16, v5p-8, v4-8 (create; required there)
  --runtime=VERSION       TPU VM image (default v2-alpha-tpuv5-lite; v2-alpha-tpuv5 for v5p,
                          tpu-ubuntu2204-base for v4)
  --spot                  create a spot (preemptible) slice through a queued resource
  --repo=URL              git repository to install (default: this checkout's origin)
  --ref=REF               git ref to install (default: main)
  --config=PATH[:ARG]     config file for run (required there), e.g. configs/stage1.py
  --workdir=gs://…        checkpoints and logs; on GCS so every worker and later runs see them
  --mode=MODE             train (default), eval, build_rag, export, predict
  --dry-run               print every command instead of running it (also DRY_RUN=1)
Everything after -- is passed to anatomix_jax.main (e.g. --config.data.records_dir=…).
USAGE
}

COMMAND="${1:-}"
[[ -z "${COMMAND}" || "${COMMAND}" == "--help" || "${COMMAND}" == "-h" ]] && { usage; exit 0; }
shift
NAME="" ZONE="" SPOT=0 REF=main RUNTIME=v2-alpha-tpuv5-lite EXTRA=""
while (($#)); do
  case "$1" in
    --spot) SPOT=1 ;;
    --help|-h) usage; exit 0 ;;
    --) shift; EXTRA="$*"; break ;;
    *) parse_option "$1" || die "unknown option $1 (see --help)" ;;
  esac
  shift
done
need NAME ZONE
REPO="${REPO:-$(git -C "$(dirname "${BASH_SOURCE[0]}")" remote get-url origin 2>/dev/null || true)}"
GCLOUD=(gcloud)
[[ -n "${PROJECT:-}" ]] && GCLOUD+=(--project="${PROJECT}")

ssh_all() {  # the same command on every worker of the slice
  run "${GCLOUD[@]}" compute tpus tpu-vm ssh "${NAME}" --zone="${ZONE}" --worker=all --command="$1"
}

create() {
  need ACCELERATOR
  if [[ "${SPOT}" == "1" ]]; then
    run "${GCLOUD[@]}" compute tpus queued-resources create "${NAME}" --node-id="${NAME}" \
      --zone="${ZONE}" --accelerator-type="${ACCELERATOR}" --runtime-version="${RUNTIME}" --spot
    run "${GCLOUD[@]}" compute tpus queued-resources describe "${NAME}" --zone="${ZONE}" \
      --format="value(state.state)"
  else
    run "${GCLOUD[@]}" compute tpus tpu-vm create "${NAME}" --zone="${ZONE}" \
      --accelerator-type="${ACCELERATOR}" --version="${RUNTIME}"
  fi
}

install() {
  need REPO
  ssh_all "set -e; rm -rf anatomix_jax && git clone ${REPO} anatomix_jax && cd anatomix_jax && git checkout ${REF} && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'"
}

run_main() {
  need CONFIG WORKDIR
  # nohup + a log per worker: the job survives a dropped ssh session; `logs` follows worker 0.
  ssh_all "cd anatomix_jax && . .venv/bin/activate && nohup $(main_command) > run.log 2>&1 &"
}

logs() {
  run "${GCLOUD[@]}" compute tpus tpu-vm ssh "${NAME}" --zone="${ZONE}" --worker=0 \
    --command="tail -f anatomix_jax/run.log"
}

delete() {
  if [[ "${SPOT}" == "1" ]]; then
    run "${GCLOUD[@]}" compute tpus queued-resources delete "${NAME}" --zone="${ZONE}" --force --quiet
  else
    run "${GCLOUD[@]}" compute tpus tpu-vm delete "${NAME}" --zone="${ZONE}" --quiet
  fi
}

case "${COMMAND}" in
  create) create ;;
  install) install ;;
  run) run_main ;;
  logs) logs ;;
  delete) delete ;;
  all) create; install; run_main ;;
  *) die "unknown command ${COMMAND} (create, install, run, logs, delete, all)" ;;
esac
