#!/usr/bin/env bash
# One task of a SLURM job step: sets the multi-process environment from SLURM's, then runs
# the command (what `srun launch/slurm_task.sh COMMAND ...` in launch/slurm.sbatch does).
#
#   launch/slurm_task.sh COMMAND [ARG ...]
#
# UNCLIP_COORDINATOR  the step's first node (`scontrol show hostnames`), port UNCLIP_PORT
#                     (default 20000 + SLURM_JOB_ID mod 20000, so two jobs sharing a first
#                     node do not collide)
# UNCLIP_NUM_PROCESSES  the step's tasks (SLURM_STEP_NUM_TASKS, else SLURM_NTASKS)
# UNCLIP_PROCESS_ID   SLURM_PROCID
# `unclip-jax train ... --distributed` reads them, as under launch/local.sh.
set -euo pipefail

if (($# == 0)) || [[ "$1" == -h || "$1" == --help ]]; then
  echo "usage: srun launch/slurm_task.sh COMMAND [ARG ...]  (inside a SLURM allocation)" >&2
  exit 2
fi
nodelist="${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}"
if [[ -z "$nodelist" || -z "${SLURM_PROCID:-}" ]]; then
  echo "slurm_task.sh: SLURM_JOB_NODELIST or SLURM_PROCID is not set: run it under srun" >&2
  exit 2
fi
mapfile -t hosts < <(scontrol show hostnames "$nodelist")
if ((${#hosts[@]} == 0)); then
  echo "slurm_task.sh: 'scontrol show hostnames $nodelist' named no host" >&2
  exit 1
fi
port="${UNCLIP_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
export UNCLIP_COORDINATOR="${hosts[0]}:$port"
export UNCLIP_NUM_PROCESSES="${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:?SLURM_NTASKS is not set}}"
export UNCLIP_PROCESS_ID="$SLURM_PROCID"
exec "$@"
