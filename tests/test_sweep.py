"""Config sweeps (unclip_jax/sweep.py, launch/sweep.py): expansion into named runs, running
them one after another (here with a stand-in for `unclip-jax train` that writes metrics at
once), the summary, and the errors."""

import csv
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest

from unclip_jax.config import config_to_json, load_config
from unclip_jax.sweep import (
    MAX_NAME,
    SweepError,
    final_metrics,
    format_table,
    plan_sweep,
    run_name,
    run_sweep,
    summarise,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP_PATH = os.path.join(REPO, "configs", "clip.py")
CLIP_TINY = f"{CLIP_PATH}:tiny"
NAMES = [
    "000-optim.lr=0.0003-optim.weight_decay=0.05",
    "001-optim.lr=0.0003-optim.weight_decay=0.1",
    "002-optim.lr=0.0005-optim.weight_decay=0.05",
    "003-optim.lr=0.0005-optim.weight_decay=0.1",
    "004-optim.lr=0.001-optim.weight_decay=0.05",
    "005-optim.lr=0.001-optim.weight_decay=0.1",
]

# Stands in for `unclip-jax train`: takes the same flags, logs two steps of made-up metrics
# (an evaluation metric at the first only), and fails with code 3 for lr 5e-4 / wd 0.05.
FAKE_TRAIN = """
import json, os, sys
args = sys.argv[1:]
workdir = args[args.index("--workdir") + 1]
config = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
with open(os.path.join(os.path.dirname(workdir), "calls.txt"), "a") as f:
    f.write(os.path.basename(workdir) + "\\n")
lr, wd = float(config["optim.lr"]), float(config["optim.weight_decay"])
print("training", os.path.basename(workdir))
if (lr, wd) == (0.0005, 0.05):
    print("diverged", file=sys.stderr)
    sys.exit(3)
with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 2, "time": 1.0, "loss": 1.0, "retrieval/top1": lr * 100}) + "\\n")
    f.write(json.dumps({"step": 4, "time": 2.0, "loss": lr + wd}) + "\\n")
"""


@pytest.fixture
def fake_train(tmp_path):
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    return [sys.executable, str(path)]


def _sweep_py(*args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "sweep.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _calls(root):
    path = root / "calls.txt"
    return path.read_text().split() if path.exists() else []


def _config_file(tmp_path, sweep_body, name="cfg.py"):
    """A config file with the tiny CLIP's variants and the given sweep() body."""
    path = tmp_path / name
    path.write_text(
        textwrap.dedent(
            f"""
            import importlib.util
            _spec = importlib.util.spec_from_file_location("_clip_for_test", {CLIP_PATH!r})
            _clip = importlib.util.module_from_spec(_spec)
            _spec.loader.exec_module(_clip)

            def get_config(arg="tiny"):
                return _clip.get_config(arg)
            """
        )
        + textwrap.dedent(sweep_body)
    )
    return str(path)


# ---- expansion -------------------------------------------------------------------------------


def test_each_point_gets_a_stable_readable_unique_name():
    runs = plan_sweep(CLIP_TINY)
    assert [r.name for r in runs] == NAMES
    assert [r.config.optim.lr for r in runs] == [3e-4, 3e-4, 5e-4, 5e-4, 1e-3, 1e-3]
    assert run_name(3, {"model.channel_mult": (1, 2), "a": "x y/z", "b": True}) == (
        "003-model.channel_mult=1,2-a=x_y_z-b=true"
    )
    assert run_name(0, {"optim.lr": 1e-5}) == "000-optim.lr=1e-05"  # the float reads back
    long_a = run_name(1, {"data.data_dir": "/very/long/" * 20 + "a"})
    long_b = run_name(1, {"data.data_dir": "/very/long/" * 20 + "b"})
    assert len(long_a) == MAX_NAME and long_a != long_b  # cut, and told apart by a hash
    assert run_name(12, {}, width=3) == "012"


def test_a_sweep_writes_its_plan_and_configs_records_a_failure_and_goes_on(tmp_path, fake_train):
    root = tmp_path / "sweep"
    out = io.StringIO()
    rows = run_sweep(CLIP_TINY, root, {"train.steps": "4"}, train_command=fake_train, out=out)

    record = json.loads((root / "sweep.json").read_text())
    assert [r["name"] for r in record["runs"]] == NAMES
    assert record["runs"][2]["point"] == {"optim.lr": 0.0005, "optim.weight_decay": 0.05}
    assert record["overrides"] == {"train.steps": "4"}
    assert record["spec"] == CLIP_TINY
    # Each run's config is saved before it starts, as `unclip-jax train` will build it.
    for r in record["runs"]:
        expected = load_config(CLIP_TINY, {"train.steps": 4, **r["point"]})
        assert (root / r["name"] / "config.json").read_text() == config_to_json(expected) + "\n"

    # Run 2 failed with code 3; every run was tried, in order.
    assert _calls(root) == NAMES
    status = json.loads((root / NAMES[2] / "sweep_run.json").read_text())
    assert (status["status"], status["returncode"]) == ("failed", 3)
    assert "diverged" in (root / NAMES[2] / "train.log").read_text()
    assert [r["status"] for r in rows] == ["finished"] * 2 + ["failed"] + ["finished"] * 3

    # The summary: one row per run, its overrides, the last step and last value of each metric.
    with open(root / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == NAMES
    assert list(table[0]) == [
        "run", "status", "returncode", "optim.lr", "optim.weight_decay", "step", "loss",
        "retrieval/top1",
    ]  # fmt: skip
    assert table[5]["optim.lr"] == "0.001" and table[5]["step"] == "4"
    assert float(table[5]["loss"]) == pytest.approx(0.101)
    assert float(table[5]["retrieval/top1"]) == pytest.approx(0.1)  # logged at step 2 only
    assert (table[2]["status"], table[2]["returncode"], table[2]["loss"]) == ("failed", "3", "")
    assert json.loads((root / "summary.json").read_text()) == json.loads(json.dumps(rows))
    printed = [line.split() for line in out.getvalue().splitlines()]
    assert [NAMES[5], "finished", "0", "0.001", "0.1", "4", "0.101", "0.1"] in printed

    # A rerun skips the finished runs and tries the failed one again.
    run_sweep(CLIP_TINY, root, {"train.steps": "4"}, train_command=fake_train, out=io.StringIO())
    assert _calls(root) == [*NAMES, NAMES[2]]


def test_summarise_reads_finished_runs_without_training(tmp_path):
    root = tmp_path / "sweep"
    runs = plan_sweep(CLIP_TINY)
    root.mkdir()
    (root / "sweep.json").write_text(
        json.dumps({"runs": [{"name": r.name, "point": r.point} for r in runs[:3]]})
    )
    for i, r in enumerate(runs[:2]):
        (root / r.name).mkdir()
        (root / r.name / "sweep_run.json").write_text('{"status": "finished", "returncode": 0}')
        lines = [
            {"step": 10, "time": 0, "loss": 2.0 + i, "eval/cosine": 0.5},
            {"step": 20, "time": 0, "loss": 1.0 + i, "grad_norm": float("nan")},
        ]
        text = "".join(json.dumps(line) + "\n" for line in lines)
        if i == 1:
            text += '{"step": 30, "lo'  # cut short by a killed run
        (root / r.name / "metrics.jsonl").write_text(text)
    rows = summarise(root)
    assert [(r["status"], r["step"], r.get("loss")) for r in rows] == [
        ("finished", 20, 1.0),
        ("finished", 20, 2.0),
        ("pending", None, None),
    ]
    assert rows[0]["eval/cosine"] == 0.5 and "time" not in rows[0]
    table = format_table(rows).splitlines()
    assert table[0].split() == [
        "run", "status", "returncode", "optim.lr", "optim.weight_decay", "step", "loss",
        "eval/cosine", "grad_norm",
    ]  # fmt: skip
    assert set(table[1]) == {"-", " "}
    assert table[2].split() == [
        runs[0].name,
        "finished",
        "0",
        "0.0003",
        "0.05",
        "20",
        "1",
        "0.5",
        "nan",
    ]
    assert table[4].split()[1:] == ["pending", "-", "0.0005", "0.05", "-", "-", "-", "-"]
    assert final_metrics(tmp_path / "nothing") == {}

    # The same from the command line, and nothing written but the summary files.
    before = sorted(p.name for p in root.iterdir())
    result = _sweep_py("summarise", "--root", str(root), "--metrics", "loss")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[-2:] == ["step", "loss"]
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [*before, "summary.csv", "summary.json"]
    )


# ---- errors ------------------------------------------------------------------------------------


def test_a_root_holding_another_sweep_is_refused_and_left_as_it_was(tmp_path, fake_train):
    root = tmp_path / "sweep"
    run_sweep(CLIP_TINY, root, train_command=fake_train, out=io.StringIO())
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    with pytest.raises(
        SweepError, match=r"holds another sweep: .* differs at train.seed: 0 \(saved\) vs 1"
    ):
        run_sweep(CLIP_TINY, root, {"train.seed": "1"}, train_command=fake_train)
    other = _config_file(tmp_path, "def sweep():\n    yield {'optim.lr': 0.1}\n")
    with pytest.raises(SweepError, match=r"runs \[.*'000-optim.lr=0.0003-optim.weight_decay=0.05'"):
        run_sweep(f"{other}:tiny", root, train_command=fake_train)
    same_points = _config_file(
        tmp_path,
        "def sweep():\n    yield from _clip.sweep()\n"
        "def get_config(arg='tiny'):\n"
        "    c = _clip.get_config(arg)\n    c.train.steps = 5\n    return c\n",
        name="edited.py",
    )
    with pytest.raises(SweepError, match=r"base config differs at train.steps: 4 \(saved\) vs 5"):
        run_sweep(f"{same_points}:tiny", root, train_command=fake_train)
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before

    # The same config reached by other overrides is the same sweep: only the failed run reruns.
    run_sweep(CLIP_TINY, root, {"train.steps": "4"}, train_command=fake_train, out=io.StringIO())
    assert _calls(root) == [*NAMES, NAMES[2]]


def test_bad_sweeps_are_errors_that_name_the_problem(tmp_path):
    no_sweep = _config_file(tmp_path, "", name="no_sweep.py")
    with pytest.raises(SweepError, match=r"defines no sweep\(\)"):
        plan_sweep(f"{no_sweep}:tiny")
    typo = _config_file(tmp_path, "def sweep():\n    yield {'optim.lrr': 0.1}\n", name="typo.py")
    with pytest.raises(
        SweepError, match=r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"
    ):
        plan_sweep(f"{typo}:tiny")
    empty = _config_file(tmp_path, "def sweep():\n    yield from ()\n", name="empty.py")
    with pytest.raises(SweepError, match="yields no point"):
        plan_sweep(f"{empty}:tiny")
    with pytest.raises(SweepError, match=r"--config.optim.lr sets a key the sweep .* varies"):
        plan_sweep(CLIP_TINY, {"optim.lr": "0.1"})

    # From the command line: exit code 2, the message, and nothing written.
    root = tmp_path / "root"
    result = _sweep_py("--config", f"{typo}:tiny", "--root", str(root))
    assert result.returncode == 2
    assert "sweep: error:" in result.stderr and "'optim.lrr'" in result.stderr
    assert not root.exists()


def test_the_command_line_runs_the_sweep_and_exits_1_when_a_run_failed(tmp_path, fake_train):
    root = tmp_path / "sweep"
    args = ["--config", CLIP_TINY, "--root", str(root), "--config.train.steps=4"]
    args += ["--train-command", " ".join(fake_train)]
    dry = _sweep_py(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    expected = f"--workdir {root}/{NAMES[0]} --config.train.steps=4 --config.optim.lr=0.0003"
    assert expected in dry.stdout
    assert not root.exists()

    result = _sweep_py(*args)
    assert result.returncode == 1
    assert f"1 of 6 runs did not finish: {NAMES[2]} (failed, code 3)" in result.stderr
    assert (root / "summary.csv").exists()
