#!/usr/bin/env bash
# One GPU or TPU VM, one process: install and run (all local accelerators form the mesh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/single_vm.sh [options] [-- extra main flags]

  --accelerator=cpu|gpu|tpu  which jax to install (default cpu): gpu adds jax[cuda12]==0.10.2,
                             tpu the project's [tpu] extra (libtpu)
  --config=PATH[:ARG]        config file (required)
  --workdir=DIR              local directory or gs:// path (required)
  --mode=MODE                train (default), eval, build_rag, export, predict
  --skip-install             use the existing .venv
  --dry-run                  print the commands instead of running them
Everything after -- is passed to anatomix_jax.main.
USAGE
}

ACCELERATOR=cpu SKIP_INSTALL=0 EXTRA=""
while (($#)); do
  case "$1" in
    --help|-h) usage; exit 0 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --) shift; EXTRA="$*"; break ;;
    *) parse_option "$1" || die "unknown option $1 (see --help)" ;;
  esac
  shift
done
need CONFIG WORKDIR
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ "${SKIP_INSTALL}" == "0" ]]; then
  run python3 -m venv .venv
  case "${ACCELERATOR}" in
    cpu) run .venv/bin/pip install -q -e . ;;
    gpu) run .venv/bin/pip install -q -e . "jax[cuda12]==0.10.2" ;;
    tpu) run .venv/bin/pip install -q -e ".[tpu]" ;;
    *) die "--accelerator must be cpu, gpu or tpu, got ${ACCELERATOR}" ;;
  esac
fi
# shellcheck disable=SC2086  # EXTRA holds several flags on purpose
run .venv/bin/python -m anatomix_jax.main --config="${CONFIG}" --workdir="${WORKDIR}" \
  --mode="${MODE:-train}" ${EXTRA}
