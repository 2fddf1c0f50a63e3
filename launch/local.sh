#!/usr/bin/env bash
# Runs N processes of one command on this machine, joined into one multi-process JAX run.
#
#   launch/local.sh [-n N] [--port P] [--cpu-devices K] [--grace S] -- COMMAND [ARG ...]
#
# e.g. launch/local.sh -n 2 --cpu-devices 4 -- \
#        unclip-jax train --config configs/clip.py:tiny --workdir runs/clip --distributed
#
# Each process gets UNCLIP_COORDINATOR=localhost:P, UNCLIP_NUM_PROCESSES=N and
# UNCLIP_PROCESS_ID=0..N-1 in its environment (what `--distributed` reads); nothing is added to
# the command, so it is the same command as under launch/tpu_pod.sh and launch/slurm.sbatch.
# Every output line is prefixed with its rank ("[0] ..."). When a process fails, the others
# are stopped (SIGTERM, then SIGKILL after S seconds, default 10: a JAX peer whose partner
# died may never return) and the script exits with the failed rank's code, naming the rank.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/local.sh [-n N] [--port P] [--cpu-devices K] [--grace S] -- COMMAND [ARG ...]

Runs N processes (default 1) of COMMAND on this machine as one multi-process JAX run.
  -n, --num-processes N  how many processes (default 1)
  --port P               the coordinator's port on localhost (default: a free one)
  --cpu-devices K        give each process K fake CPU devices (XLA_FLAGS
                         --xla_force_host_platform_device_count=K), for CPU tests
  --grace S              seconds between SIGTERM and SIGKILL when stopping (default 10)
Each process sees UNCLIP_COORDINATOR, UNCLIP_NUM_PROCESSES and UNCLIP_PROCESS_ID; a
command that reads them (`unclip-jax train ... --distributed`) joins the others.
EOF
  exit 2
}

num=1
port=""
cpu_devices=""
grace=10
while (($#)); do
  case "$1" in
    -n | --num-processes) num="${2:?$1 needs a value}"; shift 2 ;;
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    --cpu-devices) cpu_devices="${2:?--cpu-devices needs a value}"; shift 2 ;;
    --grace) grace="${2:?--grace needs a value}"; shift 2 ;;
    -h | --help) usage ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option '$1' (the command goes after --)" >&2; usage ;;
  esac
done
(($#)) || { echo "local.sh: no command given (after --)" >&2; usage; }
for value in "$num" "$grace" ${port:+"$port"} ${cpu_devices:+"$cpu_devices"}; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "local.sh: '$value' is not a number" >&2; usage; }
done
((num >= 1)) || { echo "local.sh: -n must be at least 1" >&2; usage; }

if [[ -z "$port" ]]; then
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])' 2>/dev/null ||
    echo $((20000 + RANDOM % 20000)))"
fi
if ((num > 1)) && [[ " $* " != *" --distributed "* ]]; then
  echo "local.sh: warning: $num processes of a command without --distributed run apart" >&2
fi

xla_flags="${XLA_FLAGS:-}"
if [[ -n "$cpu_devices" ]]; then
  # XLA_FLAGS as it was, less any device count, plus ours.
  read -ra flags <<<"$xla_flags"
  kept=()
  for flag in ${flags[@]+"${flags[@]}"}; do
    [[ "$flag" == --xla_force_host_platform_device_count=* ]] || kept+=("$flag")
  done
  kept+=("--xla_force_host_platform_device_count=$cpu_devices")
  xla_flags="${kept[*]}"
fi

prefix_lines() {  # copies stdin to stdout line by line, each line prefixed with $1
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    printf '%s%s\n' "$1" "$line"
  done
}

declare -a pids=()      # the ranks still running (emptied as each one ends)
declare -a all_pids=()  # every rank's process group, for stopping what is left of it

stop_all() {  # stop_all SIGNAL: signal what is left of every rank's process group
  local pid
  for pid in "${all_pids[@]}"; do
    kill "-$1" -- "-$pid" 2>/dev/null || true
  done
}

shutdown() {  # SIGTERM everything, SIGKILL what is left after the grace period
  local waited=0 alive pid
  stop_all TERM
  while ((waited < grace * 5)); do
    alive=0
    for pid in "${all_pids[@]}"; do  # any process left in the rank's group
      kill -0 -- "-$pid" 2>/dev/null && alive=1
    done
    ((alive)) || return 0
    sleep 0.2
    waited=$((waited + 1))
  done
  stop_all KILL
}

# shellcheck disable=SC2317  # called by the trap
on_signal() {
  echo "local.sh: interrupted; stopping all ranks" >&2
  shutdown
  exit 130
}
trap on_signal INT TERM HUP

# Each rank runs in its own process group (job control on while they start), so that it can
# be stopped as a whole.
set -m
for ((rank = 0; rank < num; rank++)); do
  (
    set +e
    export UNCLIP_COORDINATOR="localhost:$port" UNCLIP_NUM_PROCESSES="$num" UNCLIP_PROCESS_ID="$rank"
    [[ -n "$cpu_devices" ]] && export XLA_FLAGS="$xla_flags"
    "$@" </dev/null 2>&1 | prefix_lines "[$rank] "
    exit "${PIPESTATUS[0]}"
  ) &
  pids[rank]=$!
  all_pids[rank]=$!
done
set +m  # (no job notices from here on; the groups stay)

# Wait for every rank; the first to fail stops the others.
running=$num
status=0
while ((running > 0)); do
  for ((rank = 0; rank < num; rank++)); do
    pid="${pids[rank]}"
    [[ -n "$pid" ]] || continue
    kill -0 "$pid" 2>/dev/null && continue
    set +e
    wait "$pid"
    code=$?
    set -e
    pids[rank]=""
    running=$((running - 1))
    if ((code != 0 && status == 0)); then
      status=$code
      if ((code > 128)); then
        what="was killed by signal $((code - 128))"
      else
        what="exited with code $code"
      fi
      if ((running > 0)); then
        echo "local.sh: rank $rank $what; stopping the other $running rank(s)" >&2
        shutdown
      else
        echo "local.sh: rank $rank $what" >&2
      fi
    fi
  done
  ((running > 0)) && sleep 0.2
done
exit "$status"
