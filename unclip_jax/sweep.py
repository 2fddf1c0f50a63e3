"""Config sweeps: a config file's `sweep()` expanded into named runs, run one after another,
and their final metrics summarised.

    launch/sweep.py --config configs/clip.py:tiny --root runs/sweep [--config.KEY=VALUE ...]
    launch/sweep.py summarise --root runs/sweep

Each point of the sweep is one run, named by its index and overrides (`001-optim.lr=0.0005-
optim.weight_decay=0.1`), trained by `unclip-jax train` in a workdir of its own under the root:

    ROOT/sweep.json          the sweep: config spec, base overrides and config, every run's
                             name and point; a rerun into a root holding another sweep is refused
    ROOT/NAME/config.json    the run's full config, written before it starts
    ROOT/NAME/sweep_run.json how the run went: status, exit code, command, times
    ROOT/NAME/train.log      its output (the rest of ROOT/NAME is the run's workdir)
    ROOT/summary.csv, .json  one row per run: overrides, status, the last step and the last
                             logged value of every metric in its metrics.jsonl

A rerun skips finished runs and restarts the others, which resume from their checkpoints. A run
that fails is recorded with its exit code and the sweep goes on. Runs go through a launcher:
`local` (this machine; `--launcher-args "-n 2"` runs each through launch/local.sh), `tpu_pod`
(launch/tpu_pod.sh, the same command on every worker of a pod slice) or `slurm` (`sbatch
--wait launch/slurm.sbatch`). The sweep's own files go through etils.epath, so the root may be
a gs:// path (with gcsfs installed).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from etils import epath

from unclip_jax.config import (
    ConfigDict,
    ConfigError,
    apply_overrides,
    config_to_json,
    flatten_config,
    iterate_sweep,
    load_config,
    parse_override_args,
)

LAUNCHERS = ("local", "tpu_pod", "slurm")
SWEEP_FILE = "sweep.json"
RUN_FILE = "sweep_run.json"
# The launch/ folder of the repository this package is installed from (editable installs).
LAUNCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
# Longest run name kept whole; longer ones are cut and end in a hash of the point.
MAX_NAME = 100


class SweepError(ConfigError):
    """A sweep that cannot run as asked (its root holds another sweep, ...), named in the message."""


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One point of a sweep: its name (also its workdir under the root), overrides and config."""

    index: int
    name: str
    point: dict[str, Any]
    config: ConfigDict


# ---------------------------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same float
    if isinstance(value, (tuple, list)):
        return ",".join(_format_value(v) for v in value)
    return str(value)


def run_name(index: int, point: Mapping[str, Any], *, width: int = 3) -> str:
    """A stable, readable name for point `index`: `007-optim.lr=0.0003-model.dropout=0.1`.

    Only letters, digits and `._,=+-` are kept (others become `_`), so the name is safe as a
    folder on any file system and as a GCS object prefix; names over MAX_NAME characters are
    cut and end in a hash of the point. The index prefix keeps names unique.
    """
    parts = [f"{index:0{width}d}"]
    parts += [f"{key}={_format_value(value)}" for key, value in point.items()]
    name = re.sub(r"[^A-Za-z0-9._,=+-]", "_", "-".join(parts))
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(_to_json(dict(point)).encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9]}-{digest}"
    return name


def _to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value, default=str))


def override_arg(value: Any) -> str:
    """The text of `--config.KEY=TEXT` that `unclip-jax train` parses back into `value`."""
    if isinstance(value, str):
        return value
    return repr(value)


def plan_sweep(spec: str, overrides: Mapping[str, Any] | None = None) -> list[SweepRun]:
    """The runs of the sweep of config `spec` (`path[:variant]`), each point on top of `overrides`.

    Every point is checked first (an unknown key or a bad value is a SweepError naming it).
    An override that fixes a key the sweep varies is an error: the sweep would repeat one run.
    """
    overrides = dict(overrides or {})
    try:
        points = list(iterate_sweep(spec))
    except ConfigError as err:
        raise SweepError(f"the sweep of {spec}: {err}") from None
    if not points:
        raise SweepError(f"the sweep() of {spec} yields no point")
    swept = {key for point, _ in points for key in point}
    fixed = sorted(swept & set(overrides))
    if fixed:
        raise SweepError(
            f"--config.{fixed[0]} sets a key the sweep of {spec} varies "
            f"({', '.join(sorted(swept))}): drop it or change the sweep"
        )
    base = load_config(spec, overrides)  # checks the overrides once, before any point
    width = max(3, len(str(len(points) - 1)))
    runs = []
    for index, (point, _) in enumerate(points):
        config = apply_overrides(base, point)
        # The run trains from the command line: the point must survive being text.
        as_text = apply_overrides(base, {k: override_arg(v) for k, v in point.items()})
        if config_to_json(as_text) != config_to_json(config):
            raise SweepError(
                f"sweep point {index} {point} of {spec} does not read back the same from the "
                "command line (--config.KEY=VALUE); use plain values"
            )
        runs.append(SweepRun(index, run_name(index, point, width=width), point, config))
    return runs


def sweep_record(
    spec: str, overrides: Mapping[str, Any], runs: Sequence[SweepRun]
) -> dict[str, Any]:
    """What ROOT/sweep.json holds: enough to tell whether a root holds this sweep."""
    base = load_config(spec, overrides)
    return _jsonable(
        {
            "spec": spec,
            "stage": base.get("stage"),
            "overrides": dict(overrides),
            "base_config": base.to_dict(),
            "runs": [{"name": r.name, "point": r.point} for r in runs],
        }
    )


def _first_difference(saved: Any, now: Any) -> str:
    a, b = flatten_config(saved), flatten_config(now)
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            return (
                f"{key}: {a.get(key, '<missing>')!r} (saved) vs {b.get(key, '<missing>')!r} (now)"
            )
    return "nothing"


def check_root(root: epath.PathLike, record: Mapping[str, Any]) -> bool:
    """Whether ROOT already holds this sweep (True) or nothing (False); SweepError if another.

    The same sweep: the same run names and points on the same base config (overrides spelt
    otherwise that give the same config are the same sweep). Reads only.
    """
    path = epath.Path(root) / SWEEP_FILE
    if not path.exists():
        return False
    try:
        saved = json.loads(path.read_text())
    except ValueError as err:
        raise SweepError(
            f"{path} is not JSON ({err}); move it away to start a sweep here"
        ) from None
    where = f"{path} holds another sweep"
    hint = "use another --root (nothing there was changed)"
    saved_runs = [(r.get("name"), r.get("point")) for r in saved.get("runs", [])]
    runs = [(r["name"], r["point"]) for r in record["runs"]]
    if saved_runs != runs:
        extra = [n for n, _ in runs if n not in dict(saved_runs)]
        missing = [n for n, _ in saved_runs if n not in dict(runs)]
        raise SweepError(
            f"{where}: runs {missing or '[]'} there are not in this sweep and "
            f"{extra or '[]'} here are not there; {hint}"
        )
    if saved.get("base_config") != record["base_config"]:
        raise SweepError(
            f"{where}: its base config differs at "
            f"{_first_difference(saved.get('base_config'), record['base_config'])}; {hint}"
        )
    return True


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _launch_script(name: str) -> str:
    path = os.path.join(LAUNCH_DIR, name)
    if not os.path.isfile(path):
        raise SweepError(f"launcher script {path} not found: run sweeps from a checkout")
    return path


def run_command(
    spec: str,
    workdir: str,
    overrides: Mapping[str, Any],
    point: Mapping[str, Any],
    *,
    launcher: str = "local",
    launcher_args: Sequence[str] = (),
    train_command: Sequence[str] | None = None,
) -> list[str]:
    """The command that trains one run: `unclip-jax train` with the run's flags, launched.

    `local` with no launcher args runs train here directly; with launcher args (`-n 2 ...`)
    it goes through launch/local.sh (both with this interpreter's unclip_jax). `tpu_pod` runs
    launch/tpu_pod.sh LAUNCHER_ARGS -- ... and `slurm` `sbatch --wait LAUNCHER_ARGS
    launch/slurm.sbatch ...`; through a launcher script the command gets `--distributed`.
    """
    if launcher not in LAUNCHERS:
        raise SweepError(f"unknown launcher {launcher!r}; valid launchers: {', '.join(LAUNCHERS)}")
    direct = launcher == "local" and not launcher_args
    if train_command is None:  # this interpreter's package here, the environment's elsewhere
        local = [sys.executable, "-m", "unclip_jax", "train"]
        train_command = local if launcher == "local" else ["unclip-jax", "train"]
    train = [*train_command, "--config", spec, "--workdir", workdir]
    train += [f"--config.{k}={override_arg(v)}" for k, v in overrides.items()]
    train += [f"--config.{k}={override_arg(v)}" for k, v in point.items()]
    if direct:
        return train
    train.append("--distributed")
    if launcher == "local":
        return [_launch_script("local.sh"), *launcher_args, "--", *train]
    if launcher == "tpu_pod":
        return [_launch_script("tpu_pod.sh"), *launcher_args, "--", *train]
    extra = (
        []
        if any(a.startswith(("--output", "-o")) for a in launcher_args)
        else [f"--output={workdir}/slurm-%j.out"]
    )
    return ["sbatch", "--wait", *extra, *launcher_args, _launch_script("slurm.sbatch"), *train]


def _write_json(path: epath.Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def _read_json(path: epath.Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        return None


def _execute(command: Sequence[str], log_path: epath.Path, out: TextIO) -> int:
    """Runs `command`, its output to `out` and to `log_path`; stops it on Ctrl-C (re-raised)."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                out.flush()
                log.write(line)
            return proc.wait()
        except BaseException:
            proc.terminate()  # train saves a checkpoint on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise


def run_sweep(
    spec: str,
    root: epath.PathLike,
    overrides: Mapping[str, Any] | None = None,
    *,
    launcher: str = "local",
    launcher_args: Sequence[str] = (),
    train_command: Sequence[str] | None = None,
    dry_run: bool = False,
    out: TextIO | None = None,
    table_columns: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Expands the sweep into ROOT, trains each run not finished yet, and summarises them all.

    Everything is checked before anything is written: the points, the overrides, and that
    ROOT holds no other sweep. A run that fails is recorded (status `failed`, its exit code)
    and the next one starts. `dry_run` prints the runs and their commands and writes nothing.
    Returns the summary rows (see `summarise`); `table_columns` picks the printed metrics.
    """
    out = out or sys.stdout
    root = epath.Path(root)
    overrides = dict(overrides or {})
    runs = plan_sweep(spec, overrides)
    record = sweep_record(spec, overrides, runs)
    existing = check_root(root, record)
    commands = {
        r.name: run_command(
            spec,
            os.fspath(root / r.name),
            overrides,
            r.point,
            launcher=launcher,
            launcher_args=launcher_args,
            train_command=train_command,
        )
        for r in runs
    }
    if dry_run:
        print(f"# {len(runs)} runs of {spec} into {root}", file=out)
        for r in runs:
            print(f"{r.name}\n  {shlex.join(commands[r.name])}", file=out)
        return []

    if not existing:
        root.mkdir(parents=True, exist_ok=True)
        _write_json(root / SWEEP_FILE, record)
    for number, r in enumerate(runs, start=1):
        run_dir = root / r.name
        status = _read_json(run_dir / RUN_FILE)
        if status and status.get("status") == "finished":
            print(f"[sweep] {number}/{len(runs)} {r.name}: finished before, skipped", file=out)
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config_to_json(r.config) + "\n")
        command = commands[r.name]
        info: dict[str, Any] = {
            "name": r.name,
            "point": r.point,
            "command": command,
            "status": "running",
            "started": time.time(),
        }
        _write_json(run_dir / RUN_FILE, info)
        print(f"[sweep] {number}/{len(runs)} {r.name}: {shlex.join(command)}", file=out, flush=True)
        try:
            code = _execute(command, run_dir / "train.log", out)
        except KeyboardInterrupt:
            _write_json(run_dir / RUN_FILE, {**info, "status": "interrupted", "ended": time.time()})
            raise
        except OSError as err:  # the command itself could not start
            print(f"[sweep] {r.name}: could not start: {err}", file=out)
            code = 127
        ended = time.time()
        info.update(
            status="finished" if code == 0 else "failed",
            returncode=code,
            ended=ended,
            seconds=round(ended - info["started"], 1),
        )
        _write_json(run_dir / RUN_FILE, info)
        print(f"[sweep] {r.name}: {info['status']} (exit code {code})", file=out, flush=True)
    return write_summary(root, out=out, table_columns=table_columns)


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def final_metrics(workdir: epath.PathLike) -> dict[str, Any]:
    """The last logged step and the last logged value of every metric in WORKDIR/metrics.jsonl.

    Metrics logged at other intervals (evaluations) keep their own last value. Empty when the
    run logged nothing.
    """
    from unclip_jax.training.metrics import read_metrics

    workdir = epath.Path(workdir)
    if not (workdir / "metrics.jsonl").exists():
        return {}
    try:
        records = read_metrics(os.fspath(workdir))
    except ValueError:  # a line cut short by a killed run: keep what reads
        records = []
        for line in (workdir / "metrics.jsonl").read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    final: dict[str, Any] = {}
    for record in records:
        final.update(record)
    final.pop("time", None)
    return final


def summarise(root: epath.PathLike) -> list[dict[str, Any]]:
    """One row per run of the sweep in ROOT: name, status, exit code, its overrides, and the
    final step and metrics (`final_metrics`). Reads only."""
    root = epath.Path(root)
    record = _read_json(root / SWEEP_FILE)
    if record is None:
        raise SweepError(f"no sweep in {root}: {root / SWEEP_FILE} is missing or not JSON")
    rows = []
    for run in record.get("runs", []):
        run_dir = root / run["name"]
        status = _read_json(run_dir / RUN_FILE) or {}
        row: dict[str, Any] = {
            "run": run["name"],
            "status": status.get("status", "pending"),
            "returncode": status.get("returncode"),
        }
        row.update(run["point"])
        metrics = final_metrics(run_dir)
        row["step"] = metrics.pop("step", None)
        row.update(metrics)
        rows.append(row)
    return rows


def _columns(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """(run, status, returncode, the swept keys, step) and the metric names (loss first).

    A `summarise` row holds the first group up to "step", then its metrics.
    """
    fixed: list[str] = []
    metrics: set[str] = set()
    for row in rows:
        keys = list(row)
        cut = keys.index("step") + 1
        fixed += [k for k in keys[:cut] if k not in fixed]
        metrics.update(keys[cut:])
    return fixed, sorted(metrics - set(fixed), key=lambda k: (k != "loss", k))


def _all_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    fixed, metrics = _columns(rows)
    return fixed + metrics


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value)
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows as an aligned plain-text table (floats to 4 significant digits, missing as `-`)."""
    columns = list(columns or _all_columns(rows))
    cells = [columns] + [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as CSV text: a header of every column, full-precision values, empty for missing."""
    columns = _all_columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        values = [row.get(c) for c in columns]
        writer.writerow(["" if v is None else _csv_value(v) for v in values])
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def write_summary(
    root: epath.PathLike,
    *,
    out: TextIO | None = None,
    table_columns: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Summarises the sweep in ROOT: prints the table, writes ROOT/summary.csv and .json.

    `table_columns` picks the printed metrics (the files have all of them).
    """
    out = out or sys.stdout
    root = epath.Path(root)
    rows = summarise(root)
    (root / "summary.csv").write_text(summary_csv(rows))
    _write_json(root / "summary.json", rows)
    fixed, metrics = _columns(rows)
    if table_columns:  # (after the runs: a typo here must not cost a sweep)
        unknown = [m for m in table_columns if m not in metrics]
        if unknown:
            print(
                f"[sweep] no metric {', '.join(unknown)}; metrics: {', '.join(metrics)}", file=out
            )
        metrics = [m for m in table_columns if m in metrics]
    print(format_table(rows, fixed + metrics), file=out)
    print(f"(written to {root / 'summary.csv'} and summary.json)", file=out)
    return rows


# ---------------------------------------------------------------------------------------------
# Command line (`launch/sweep.py`, or `unclip-jax sweep` once registered)
# ---------------------------------------------------------------------------------------------


def add_args(parser: argparse.ArgumentParser) -> None:
    """Declares the sweep command's arguments (overrides come as --config.KEY=VALUE)."""
    parser.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=("run", "summarise", "summarize"),
        help="run (default): expand, train what is not finished, summarise; summarise: only "
        "the summary of ROOT",
    )
    parser.add_argument(
        "--config",
        metavar="FILE[:VARIANT]",
        help="the stage config whose sweep() to run, e.g. configs/clip.py:tiny; "
        "--config.KEY=VALUE sets a key for every run",
    )
    parser.add_argument(
        "--root", required=True, help="one workdir per run goes here (a local path or gs://)"
    )
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local")
    parser.add_argument(
        "--launcher-args",
        default="",
        metavar="'ARGS'",
        help="arguments for the launcher, one string: local: '-n 2 --cpu-devices 4'; "
        "tpu_pod: '--tpu NAME --zone ZONE'; slurm: sbatch options '--nodes=2'",
    )
    parser.add_argument(
        "--train-command",
        default=None,
        metavar="'CMD'",
        help="what trains a run instead of `unclip-jax train` (one string; it gets --config, "
        "--workdir and the overrides)",
    )
    parser.add_argument(
        "--metrics",
        default=None,
        metavar="A,B",
        help="only these metric columns in the printed table (the CSV has all)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the runs and their commands; write nothing"
    )


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    """Runs the sweep command; 0 when every run finished, 1 when one failed, SweepError else."""
    metrics = [m for m in (args.metrics or "").split(",") if m]
    if args.action in ("summarise", "summarize"):
        if overrides or args.config:
            raise SweepError("summarise reads ROOT only: give no --config or overrides")
        write_summary(args.root, table_columns=metrics or None)
        return 0
    if not args.config:
        raise SweepError("a sweep needs --config FILE[:VARIANT]")
    train_command = shlex.split(args.train_command) if args.train_command else None
    rows = run_sweep(
        args.config,
        args.root,
        overrides,
        launcher=args.launcher,
        launcher_args=shlex.split(args.launcher_args),
        train_command=train_command,
        dry_run=args.dry_run,
        table_columns=metrics or None,
    )
    failed = [r for r in rows if r["status"] != "finished"]
    if failed:
        names = ", ".join(f"{r['run']} ({r['status']}, code {r['returncode']})" for r in failed)
        print(f"[sweep] {len(failed)} of {len(rows)} runs did not finish: {names}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`launch/sweep.py`: parses the arguments and runs; 2 for a usage, config or sweep error."""
    parser = argparse.ArgumentParser(
        prog="launch/sweep.py", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    add_args(parser)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args, parse_override_args(rest))
    except ConfigError as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
