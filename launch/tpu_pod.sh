#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM pod slice (the same command everywhere).
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--setup [--copy]] [--dry-run] \
#       -- unclip-jax train --config configs/decoder.py:paper --workdir gs://BUCKET/run --distributed
#
# `--distributed` with nothing else makes every worker call jax.distributed.initialize(),
# which finds the slice's other workers by itself. Each worker has its own disk: the workdir
# must be one they all see (a gs:// path; orbax writes checkpoints there).
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/tpu_pod.sh --tpu NAME --zone ZONE [options] -- COMMAND [ARG ...]

Runs COMMAND on every worker of the TPU VM NAME with
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=...
in the repository checkout there, with its virtual environment active.
  --project P      the Google Cloud project (default: gcloud's)
  --worker W       the workers (default all; e.g. 0 to try a command on one)
  --setup          first install the repository on every worker: clone --repo at --ref
                   (default: this checkout's origin and commit) and pip install -e '.[tpu]'
  --copy           with --setup: copy this checkout's files (tracked and untracked, not
                   ignored) instead of cloning
  --repo URL       the git URL to clone (default: this checkout's remote 'origin')
  --ref REF        the commit, tag or branch to check out (default: this checkout's HEAD)
  --dir DIR        the checkout on the workers, relative to home (default unclip-jax)
  --venv DIR       the virtual environment on the workers, relative to home
                   (default unclip-venv)
  --python PY      the interpreter that makes the environment (default python3; >= 3.11)
  --extras E       the pip extras to install (default tpu)
  --env K=V        export K=V for the command on every worker (repeatable)
  --detach         leave the command running on the workers (nohup), output in
                   ~/unclip-jax.log on each; without it, ssh streams the output and a
                   dropped connection ends the run (it resumes from its last checkpoint)
  --dry-run        print the gcloud commands instead of running them
With no COMMAND, only --setup runs.
EOF
  exit 2
}

# A word quoted for a POSIX shell: left bare when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {  # quote_all ARG ...: the arguments as one shell command line
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "$arg")"
  done
  printf '%s' "$out"
}

run() {  # run ARG ...: runs a command, or with --dry-run prints it
  if ((dry_run)); then
    quote_all "$@"
    printf '\n'
  else
    "$@"
  fi
}

tpu="" zone="" project="" worker="all" setup=0 copy=0 repo="" ref="" dry_run=0 detach=0
dir="unclip-jax" venv="unclip-venv" python="python3" extras="tpu"
declare -a envs=()
while (($#)); do
  case "$1" in
    --tpu) tpu="${2:?--tpu needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --worker) worker="${2:?--worker needs a value}"; shift 2 ;;
    --setup) setup=1; shift ;;
    --copy) copy=1; shift ;;
    --repo) repo="${2:?--repo needs a value}"; shift 2 ;;
    --ref) ref="${2:?--ref needs a value}"; shift 2 ;;
    --dir) dir="${2:?--dir needs a value}"; shift 2 ;;
    --venv) venv="${2:?--venv needs a value}"; shift 2 ;;
    --python) python="${2:?--python needs a value}"; shift 2 ;;
    --extras) extras="${2:?--extras needs a value}"; shift 2 ;;
    --env)
      [[ "${2:-}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || { echo "tpu_pod.sh: --env takes KEY=VALUE" >&2; usage; }
      envs+=("$2"); shift 2 ;;
    --detach) detach=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option '$1' (the command goes after --)" >&2; usage ;;
  esac
done
[[ -n "$tpu" ]] || { echo "tpu_pod.sh: --tpu NAME is required" >&2; usage; }
[[ -n "$zone" ]] || { echo "tpu_pod.sh: --zone ZONE is required" >&2; usage; }
(($# || setup)) || { echo "tpu_pod.sh: give --setup, a command after --, or both" >&2; usage; }
((copy && !setup)) && { echo "tpu_pod.sh: --copy goes with --setup" >&2; usage; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
declare -a where=("$tpu" "--zone=$zone" "--worker=$worker")
[[ -n "$project" ]] && where+=("--project=$project")

on_workers() {  # on_workers SCRIPT: runs a shell command line on the workers
  run gcloud compute tpus tpu-vm ssh "${where[@]}" "--command=$1"
}

# ---- set-up: the repository and its environment on every worker --------------------------
if ((setup)); then
  install="cd && { [ -x $(quote "$venv")/bin/python ] || $(quote "$python") -m venv $(quote "$venv"); }"
  install+=" && $(quote "$venv")/bin/pip install --quiet --upgrade pip"
  pkg="$dir"
  [[ "$pkg" == /* ]] || pkg="./$pkg"  # a path to pip, not a name on PyPI
  install+=" && $(quote "$venv")/bin/pip install --quiet -e $(quote "${pkg}[$extras]")"
  if ((copy)); then
    archive="$(mktemp "${TMPDIR:-/tmp}/unclip-jax-src.XXXXXX")"
    trap 'rm -f "$archive"' EXIT
    if ((dry_run)); then
      printf '# tar of the files of %s (git ls-files) into %s\n' "$here" "$archive"
    else
      (cd "$here" && git ls-files -z --cached --others --exclude-standard |
        tar --null -T - -czf "$archive")
    fi
    run gcloud compute tpus tpu-vm scp "$archive" "$tpu:unclip-jax-src.tgz" "${where[@]:1}"
    on_workers "cd && mkdir -p $(quote "$dir") && tar -xzf unclip-jax-src.tgz -C $(quote "$dir") && rm unclip-jax-src.tgz && $install"
  else
    if [[ -z "$repo" ]]; then
      repo="$(git -C "$here" remote get-url origin 2>/dev/null)" ||
        { echo "tpu_pod.sh: this checkout has no remote 'origin': give --repo URL or use --copy" >&2; exit 2; }
    fi
    if [[ -z "$ref" ]]; then
      ref="$(git -C "$here" rev-parse HEAD)"
      if [[ -n "$(git -C "$here" status --porcelain --untracked-files=no)" ]]; then
        echo "tpu_pod.sh: warning: uncommitted changes here are not on the workers (--copy sends them)" >&2
      fi
    fi
    q_dir="$(quote "$dir")"
    fetch="cd && { [ -d $q_dir/.git ] || git clone --quiet $(quote "$repo") $q_dir; }"
    fetch+=" && git -C $q_dir fetch --quiet --tags origin"
    # A branch is checked out as origin/BRANCH (the clone's own may be old); a tag or commit as is.
    fetch+=" && { git -C $q_dir checkout --quiet --detach $(quote "origin/$ref") 2>/dev/null"
    fetch+=" || git -C $q_dir checkout --quiet --detach $(quote "$ref"); }"
    on_workers "$fetch && $install"
  fi
fi

# ---- the command, on every worker at once -------------------------------------------------
(($#)) || exit 0
for ((i = 1; i <= $#; i++)); do
  arg="${!i}"
  next=$((i + 1))
  case "$arg" in
    --workdir=*) workdir="${arg#--workdir=}" ;;
    --workdir) workdir="${!next:-}" ;;
    *) continue ;;
  esac
  if [[ "$workdir" != gs://* ]]; then
    echo "tpu_pod.sh: warning: --workdir $workdir is not on GCS: each worker has its own disk, so use gs://BUCKET/... (or a mount every worker shares)" >&2
  fi
done

script="exec $(quote_all "$@")"
for ((i = ${#envs[@]} - 1; i >= 0; i--)); do
  script="export $(quote "${envs[i]}") && $script"
done
if ((detach)); then
  script="nohup sh -c $(quote "$script") > ~/unclip-jax.log 2>&1 < /dev/null &"
fi
on_workers "cd && . $(quote "$venv")/bin/activate && cd $(quote "$dir") && $script"
