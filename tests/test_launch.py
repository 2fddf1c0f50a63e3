"""The launchers of launch/: N local processes, a TPU pod slice (its gcloud commands), SLURM.

Every process is bounded by a timeout; on expiry the whole session it started is killed (a
multi-process JAX peer that lost its partner may otherwise wait forever).
"""

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from unclip_jax.training.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
CLIP_TINY = os.path.join(REPO, "configs", "clip.py") + ":tiny"


def _session_pids(sid):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # the session id, after state, ppid, pgrp
                pids.append(int(entry))
    return pids


def _kill_session(sid):
    for pid in _session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _start(command, env=None, text=True):
    """Starts `command` in a session of its own (so that a timeout can kill all it started)."""
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=text,
        start_new_session=True,
    )


def _finish(proc, timeout):
    """(exit code, stdout, stderr); on timeout SIGTERM, then everything in its session killed."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # local.sh stops its ranks
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            _kill_session(proc.pid)
            out, err = proc.communicate()
        pytest.fail(f"{proc.args} ran past {timeout} s:\n{out[-3000:]!s}\n{err[-3000:]!s}")
    finally:
        _kill_session(proc.pid)  # nothing it started outlives the test
    return proc.returncode, out, err


def _run(command, timeout=60, env=None):
    return _finish(_start(command, env), timeout)


def _script(line):
    """'local.sh -n 2 ...' -> [path of launch/local.sh, '-n', '2', ...]."""
    name, *args = shlex.split(line)
    return [os.path.join(LAUNCH, name), *args]


def _jax_env(devices):
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        # The tests' compilation cache (tests/conftest.py): a rerun skips XLA's compiles.
        "JAX_COMPILATION_CACHE_DIR": os.environ.get(
            "UNCLIP_JAX_TEST_CACHE", os.path.expanduser("~/.cache/unclip_jax/jax_tests")
        ),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }


# ---- launch/local.sh --------------------------------------------------------------------------


def test_two_processes_through_local_sh_reach_the_losses_of_one(tmp_path):
    def train(workdir):
        return [sys.executable, "-m", "unclip_jax", "train", "--config", CLIP_TINY,
                "--workdir", str(workdir), "--distributed"]  # fmt: skip

    # The same command under both; only the launcher's process count differs. The two runs
    # share the cores at once (2 cores: 32 s with the compilation cache warm, 53 s cold).
    one = _start([f"{LAUNCH}/local.sh", "--", *train(tmp_path / "one")], _jax_env(8))
    two = _start(
        [f"{LAUNCH}/local.sh", "-n", "2", "--cpu-devices", "4", "--", *train(tmp_path / "two")],
        _jax_env(8),
        text=False,  # the bytes as written: tqdm redraws its bar with \r inside a line
    )
    code_one, out_one, err_one = _finish(one, timeout=300)
    code_two, out_two, err_two = _finish(two, timeout=300)
    out_two, err_two = out_two.decode(errors="replace"), err_two.decode(errors="replace")
    assert code_one == 0, (out_one + err_one)[-3000:]
    assert code_two == 0, (out_two + err_two)[-3000:]

    # Every line carries its rank, and both ranks spoke.
    lines = [line for line in out_two.split("\n") if line]
    assert all(line.startswith(("[0] ", "[1] ")) for line in lines), lines[:5]
    assert any(line.startswith("[1] ") for line in lines)
    # One run of two processes: each saved its own data position in the shared checkpoint.
    data_dir = tmp_path / "two" / "checkpoints" / "4" / "data"
    saved = sorted(f for f in os.listdir(data_dir) if f.endswith(".json"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"]
    losses_one = [r["loss"] for r in read_metrics(tmp_path / "one")]
    losses_two = [r["loss"] for r in read_metrics(tmp_path / "two")]
    assert len(losses_one) == len(losses_two) == 4
    # Same global batches and rng; only the order of cross-device reductions may differ.
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5)


def test_local_sh_gives_each_rank_its_place_in_the_run():
    show = "import os; print(os.environ['UNCLIP_COORDINATOR'], os.environ['UNCLIP_NUM_PROCESSES'], os.environ['UNCLIP_PROCESS_ID'], os.environ['XLA_FLAGS'])"
    code, out, err = _run(
        [*_script("local.sh -n 3 --port 23456 --cpu-devices 2 --"), sys.executable, "-c", show],
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"},
    )
    assert code == 0, err
    seen = sorted(out.splitlines())
    flags = "--xla_foo=1 --xla_force_host_platform_device_count=2"
    assert seen == [f"[{i}] localhost:23456 3 {i} {flags}" for i in range(3)]


def test_a_failing_rank_stops_the_others_and_is_named(tmp_path):
    # Rank 1 fails at once; rank 0 would wait forever (as a JAX peer whose partner died does),
    # ignoring SIGTERM, so the launcher must end it with SIGKILL after the grace period.
    script = (
        "import os, signal, sys, time\n"
        "rank = int(os.environ['UNCLIP_PROCESS_ID'])\n"
        "if rank == 1:\n"
        "    time.sleep(0.5); sys.exit(3)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(600)\n"
    )
    start = time.monotonic()
    proc = _start(
        [f"{LAUNCH}/local.sh", "-n", "2", "--grace", "1", "--", sys.executable, "-c", script]
    )
    try:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 3
        assert "rank 1 exited with code 3; stopping the other 1 rank(s)" in err
        assert time.monotonic() - start < 30
        waiting = int((tmp_path / "pid").read_text())
        assert _gone(waiting), f"rank 0 (pid {waiting}) outlived the launcher"
    finally:
        _kill_session(proc.pid)


def _gone(pid, wait=2.0):
    """Whether `pid` has ended (a zombie counts: it has ended, only its exit is unread)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_local_sh_refuses_a_bad_call():
    code, _, err = _run([f"{LAUNCH}/local.sh", "-n", "two", "--", "true"])
    assert code == 2 and "'two' is not a number" in err and "usage:" in err
    code, _, err = _run([f"{LAUNCH}/local.sh", "-n", "2"])
    assert code == 2 and "no command given" in err


# ---- launch/tpu_pod.sh ------------------------------------------------------------------------


def _remote_command(printed_line):
    argv = shlex.split(printed_line)
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
    (command,) = [a for a in argv if a.startswith("--command=")]
    return argv, command[len("--command=") :]


def test_tpu_pod_dry_run_runs_the_exact_command_on_every_worker(tmp_path):
    tricky = ["it's", '"double" $HOME `date` \\', "two  spaces", "", "a;b|c&d"]
    show = "import json, os, sys; print(json.dumps([sys.argv[1:], os.environ['GREETING'], os.getcwd()]))"
    launcher = "tpu_pod.sh --tpu my-pod --zone us-central2-b --project proj --dry-run"
    command = ["python3", "-c", show, *tricky, "--workdir", "gs://bucket/run"]
    code, out, err = _run([*_script(launcher), "--env", "GREETING=hello world", "--", *command])
    assert code == 0, err
    assert "not on GCS" not in err
    (line,) = out.splitlines()
    argv, remote = _remote_command(line)
    assert argv[5:9] == ["my-pod", "--zone=us-central2-b", "--worker=all", "--project=proj"]

    # What a worker's shell makes of the command: our argv, in the checkout, venv active.
    home = tmp_path / "home"
    (home / "unclip-venv" / "bin").mkdir(parents=True)
    (home / "unclip-venv" / "bin" / "activate").write_text("export VENV_ACTIVE=1\n")
    (home / "unclip-jax").mkdir()
    result = subprocess.run(
        ["sh", "-c", remote],
        env={"HOME": str(home), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    args, greeting, cwd = json.loads(result.stdout)
    assert args == [*tricky, "--workdir", "gs://bucket/run"]
    assert greeting == "hello world"
    assert cwd == str(home / "unclip-jax")


def _git(*args, cwd):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=30,
    )


def test_tpu_pod_setup_installs_the_repository_on_a_worker_and_updates_it(tmp_path):
    # The setup a worker runs, run here: a clone of a repository at a branch, a virtual
    # environment (a stand-in `python3 -m venv` whose pip records its arguments), the package
    # installed editable with the tpu extra; then a new commit on the branch, set up again.
    origin = tmp_path / "origin"
    origin.mkdir()
    _git("init", "--quiet", "--initial-branch=release", cwd=origin)
    (origin / "VERSION").write_text("1\n")
    _git("add", "VERSION", cwd=origin)
    _git("commit", "--quiet", "-m", "one", cwd=origin)
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(
        '#!/usr/bin/env bash\n[ "$1 $2" = "-m venv" ] || exit 9\nmkdir -p "$3/bin"\n'
        'printf \'#!/usr/bin/env bash\\necho "$*" >> ~/pip_calls\\n\' > "$3/bin/pip"\n'
        'cp "$3/bin/pip" "$3/bin/python"\nchmod +x "$3/bin/pip" "$3/bin/python"\n'
    )
    (bin_dir / "python3").chmod(0o755)
    worker_env = {"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def set_up():
        launcher = _script("tpu_pod.sh --tpu pod --zone z --setup --ref release --dry-run")
        code, out, err = _run([*launcher, "--repo", str(origin)])
        assert code == 0, err
        (line,) = out.splitlines()
        result = subprocess.run(
            ["sh", "-c", _remote_command(line)[1]],
            env=worker_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr

    set_up()
    assert (home / "unclip-jax" / "VERSION").read_text() == "1\n"
    pip_calls = (home / "pip_calls").read_text().splitlines()
    assert pip_calls == ["install --quiet --upgrade pip", "install --quiet -e ./unclip-jax[tpu]"]

    (origin / "VERSION").write_text("2\n")
    _git("commit", "--quiet", "-am", "two", cwd=origin)
    set_up()
    assert (home / "unclip-jax" / "VERSION").read_text() == "2\n"


def test_tpu_pod_warns_of_a_workdir_the_workers_do_not_share():
    code, out, err = _run(
        _script("tpu_pod.sh --tpu pod --zone z --dry-run -- unclip-jax train --workdir /tmp/run")
    )
    assert code == 0, err
    assert _remote_command(out)[1].endswith("exec unclip-jax train --workdir /tmp/run")
    assert "--workdir /tmp/run is not on GCS" in err

    code, out, err = _run([f"{LAUNCH}/tpu_pod.sh", "--zone", "z", "--", "true"])
    assert code == 2 and "--tpu NAME is required" in err


# ---- launch/slurm_task.sh and launch/slurm.sbatch ---------------------------------------------


def _fake_slurm_bin(tmp_path):
    """`scontrol show hostnames` of a fixed node list, and an `srun` running each task here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(
        '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] || exit 9\n'
        'echo "$3" > "$(dirname "$0")/scontrol_arg"\nprintf "gpu-node-07\\ngpu-node-08\\n"\n'
    )
    srun = bin_dir / "srun"  # records its options, then runs the tasks one after another
    srun.write_text(
        '#!/usr/bin/env bash\nopts=()\nwhile [[ "$1" == -* ]]; do opts+=("$1"); shift; done\n'
        'echo "${opts[*]}" > "$(dirname "$0")/srun_opts"\n'
        'for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" || exit $?; done\n'
    )
    for tool in (scontrol, srun):
        tool.chmod(0o755)
    return bin_dir


SHOW_ENV = "import os, sys; print(*(os.environ[k] for k in ('UNCLIP_COORDINATOR', 'UNCLIP_NUM_PROCESSES', 'UNCLIP_PROCESS_ID')), *sys.argv[1:])"


def test_slurm_task_takes_the_coordinator_from_the_first_node(tmp_path):
    bin_dir = _fake_slurm_bin(tmp_path)
    slurm = {
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_ID": "123456",
    }
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **slurm, "SLURM_PROCID": "1"}
    code, out, err = _run([f"{LAUNCH}/slurm_task.sh", sys.executable, "-c", SHOW_ENV], env=env)
    assert code == 0, err
    # Port 20000 + job id mod 20000: the same on every task, apart for jobs sharing a node.
    assert out.split() == ["gpu-node-07:23456", "2", "1"]
    assert (bin_dir / "scontrol_arg").read_text().strip() == "gpu-node-[07-08]"

    # A step's own node list and task count come first; UNCLIP_PORT sets the port.
    step = {"SLURM_STEP_NODELIST": "gpu-node-[07-08]", "SLURM_STEP_NUM_TASKS": "16"}
    code, out, err = _run(
        [f"{LAUNCH}/slurm_task.sh", sys.executable, "-c", SHOW_ENV],
        env={**env, **step, "SLURM_JOB_NODELIST": "other", "UNCLIP_PORT": "4321"},
    )
    assert code == 0, err
    assert out.split() == ["gpu-node-07:4321", "16", "1"]

    outside = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    code, _, err = _run([f"{LAUNCH}/slurm_task.sh", "true"], env=outside)
    assert code == 2 and "run it under srun" in err


def test_slurm_sbatch_starts_one_task_wrapper_per_task(tmp_path):
    bin_dir = _fake_slurm_bin(tmp_path)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_ID": "7",
        "SLURM_SUBMIT_DIR": REPO,
    }
    code, out, err = _run(
        ["bash", f"{LAUNCH}/slurm.sbatch", sys.executable, "-c", SHOW_ENV, "a  b"], env=env
    )
    assert code == 0, err
    assert out.splitlines() == ["gpu-node-07:20007 2 0 a  b", "gpu-node-07:20007 2 1 a  b"]
    assert (bin_dir / "srun_opts").read_text().split() == ["--kill-on-bad-exit=1", "--label"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_launch_scripts_are_shellcheck_clean():
    scripts = [
        os.path.join(LAUNCH, f) for f in ("local.sh", "tpu_pod.sh", "slurm_task.sh", "slurm.sbatch")
    ]
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
