# shellcheck shell=bash
# Shared helpers of the launch scripts (sourced, not run).
#
# run CMD...    executes CMD, or with DRY_RUN=1 prints it (shell-quoted, one line) and does nothing.
# need NAME...  fails with a clear message when a required option is empty.
# Options are --name=value flags; `parse_option` maps them onto upper-case variables.

DRY_RUN="${DRY_RUN:-0}"

# One argument as the shell would need it: plain when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

run() {
  if [[ "${DRY_RUN}" == "1" ]]; then
    local arg line=""
    for arg in "$@"; do
      line+="$(quote "${arg}") "
    done
    printf '%s\n' "${line% }"
  else
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 2
}

need() {
  local name
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      local flag="${name,,}"
      die "--${flag//_/-} is required (see --help)"
    fi
  done
}

# parse_option ARG: "--some-name=value" → SOME_NAME=value; "--dry-run" → DRY_RUN=1.
# Returns 1 for anything else (the caller decides).
parse_option() {
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --*=*)
      local key="${1%%=*}"
      key="${key#--}"
      key="${key//-/_}"
      printf -v "${key^^}" '%s' "${1#*=}"
      ;;
    *) return 1 ;;
  esac
}

# The command every process runs: the trainer with the config, workdir, mode and extra flags.
main_command() {
  local cmd="python -m anatomix_jax.main --config=${CONFIG} --workdir=${WORKDIR} --mode=${MODE:-train}"
  if [[ -n "${EXTRA:-}" ]]; then
    cmd+=" ${EXTRA}"
  fi
  printf '%s' "${cmd}"
}
