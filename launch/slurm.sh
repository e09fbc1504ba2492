#!/usr/bin/env bash
# A GPU cluster under SLURM: writes an sbatch script and submits it. One process per GPU (the
# default) or per node; process 0's host is the jax.distributed coordinator, every process gets
# --num_processes/--process_id from SLURM, and the workdir lives on the shared filesystem.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/slurm.sh [options] [-- extra main flags]

  --nodes=N               nodes (default 1)
  --gpus-per-node=G       GPUs per node (default 8)
  --per=gpu|node          one process per GPU (default) or per node (it then sees all G GPUs)
  --partition=P           SLURM partition (optional)
  --time=HH:MM:SS         time limit (default 24:00:00)
  --port=PORT             coordinator port (default 12355)
  --venv=DIR              virtualenv with anatomix_jax and jax[cuda12]==0.10.2 installed
                          (default: .venv of this checkout)
  --config=PATH[:ARG]     config file (required)
  --workdir=DIR           on the shared filesystem (required)
  --mode=MODE             train (default), eval, build_rag, export, predict
  --script=FILE           where to write the sbatch script (default: WORKDIR/launch.sbatch)
  --dry-run               print the script and the sbatch command, submit nothing
Everything after -- is passed to anatomix_jax.main.
USAGE
}

NODES=1 GPUS_PER_NODE=8 PER=gpu TIME=24:00:00 PORT=12355 EXTRA=""
while (($#)); do
  case "$1" in
    --help|-h) usage; exit 0 ;;
    --) shift; EXTRA="$*"; break ;;
    *) parse_option "$1" || die "unknown option $1 (see --help)" ;;
  esac
  shift
done
need CONFIG WORKDIR
[[ "${PER}" == "gpu" || "${PER}" == "node" ]] || die "--per must be gpu or node, got ${PER}"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-${REPO_DIR}/.venv}"
SCRIPT="${SCRIPT:-${WORKDIR}/launch.sbatch}"
if [[ "${PER}" == "gpu" ]]; then
  TASKS_PER_NODE="${GPUS_PER_NODE}"
  GPU_BINDING="#SBATCH --gpus-per-task=1"   # each process sees exactly one GPU
else
  TASKS_PER_NODE=1
  GPU_BINDING="#SBATCH --gpus-per-node=${GPUS_PER_NODE}"
fi

sbatch_script() {
  cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=anatomix_jax
#SBATCH --nodes=${NODES}
#SBATCH --ntasks-per-node=${TASKS_PER_NODE}
${GPU_BINDING}
#SBATCH --time=${TIME}
#SBATCH --output=${WORKDIR}/slurm-%j.log
${PARTITION:+#SBATCH --partition=${PARTITION}}
set -euo pipefail
cd ${REPO_DIR}
. ${VENV}/bin/activate
HEAD=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1)
srun bash -c '$(main_command) --coordinator_address='"\$HEAD"':${PORT} --num_processes=\$SLURM_NTASKS --process_id=\$SLURM_PROCID'
SBATCH
}

if [[ "${DRY_RUN}" == "1" ]]; then
  echo "# ${SCRIPT}"
  sbatch_script
else
  mkdir -p "$(dirname "${SCRIPT}")"
  sbatch_script > "${SCRIPT}"
fi
run sbatch "${SCRIPT}"
