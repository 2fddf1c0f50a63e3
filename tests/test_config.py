"""Stage configs: every variant loads, overrides are typed, mistakes are named."""

import json
import pathlib
import subprocess
import sys

import pytest

from unclip_jax.config import (
    SHARED_TRAIN_FIELDS,
    ConfigError,
    apply_overrides,
    iterate_sweep,
    load_config,
    parse_override_args,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = {
    "clip": ("tiny", "shapes", "paper", "karlo"),
    "prior": ("tiny", "shapes", "paper", "paper_ar", "karlo"),
    "decoder": ("tiny", "shapes", "paper", "karlo"),
    "upsampler": ("tiny", "shapes", "paper", "paper_1024", "karlo"),
}
CASES = [(stage, variant) for stage, variants in STAGES.items() for variant in variants]


def _spec(stage, variant=None):
    path = ROOT / "configs" / f"{stage}.py"
    return f"{path}:{variant}" if variant else str(path)


@pytest.mark.parametrize("stage,variant", CASES)
def test_every_variant_loads_with_the_shared_train_fields(stage, variant):
    config = load_config(_spec(stage, variant))
    assert config.stage == stage and config.variant == variant
    for field in SHARED_TRAIN_FIELDS:
        assert isinstance(config.train[field], int) and config.train[field] >= 0, field
    assert config.train.batch_size > 0 and config.train.steps > 0


def test_paper_variants_carry_table_3():
    prior = load_config(_spec("prior", "paper"))
    assert (prior.model.width, prior.model.layers, prior.train.batch_size) == (2048, 24, 4096)
    assert (prior.optim.lr, prior.optim.b2, prior.optim.ema_decay) == (1.1e-4, 0.96, 0.9999)
    decoder = load_config(_spec("decoder", "paper"))
    assert decoder.model.channels == 512 and decoder.model.attention_resolutions == (32, 16, 8)
    assert (decoder.diffusion.variance, decoder.diffusion.loss) == ("learned_range", "hybrid")
    up = load_config(_spec("upsampler", "paper_1024"))
    assert up.diffusion.schedule == "linear" and up.model.channel_mult == (1, 1, 2, 2, 4, 4)


def test_string_overrides_take_the_type_of_the_field():
    config = load_config(
        _spec("decoder", "tiny"),
        {
            "train.batch_size": "16",
            "optim.lr": "1e-3",
            "model.channel_mult": "(1, 2, 4)",
            "model.text_encoder": "clip",
            "train.steps": "1_000",
        },
    )
    assert config.train.batch_size == 16 and config.train.steps == 1000
    assert config.optim.lr == 1e-3 and config.model.channel_mult == (1, 2, 4)
    assert config.model.text_encoder == "clip"


def test_overrides_leave_the_base_config_untouched():
    base = load_config(_spec("prior", "tiny"))
    apply_overrides(base, {"train.batch_size": 99})
    assert base.train.batch_size == 8


def test_unknown_key_is_named_with_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(_spec("decoder", "tiny"), {"train.batchsize": "16"})
    message = str(err.value)
    assert "'train.batchsize'" in message and "train.batch_size" in message
    assert "checkpoint_every" in message and "log_every" in message


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"'train.batch_size' expects an int, got 'sixteen'"):
        load_config(_spec("decoder", "tiny"), {"train.batch_size": "sixteen"})
    with pytest.raises(ConfigError, match=r"'optim.lr' expects a float"):
        load_config(_spec("prior", "tiny"), {"optim.lr": [1, 2]})


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("train.batch_size", "0", r"'train.batch_size' is 0; it must be at least 1"),
        ("train.log_every", "-1", r"'train.log_every' is -1; it must be at least 1"),
        ("sampling.steps", "abc", r"'sampling.steps' is 'abc': bad respacing"),
        ("sampling.steps", "2000", r"'sampling.steps' is '2000': cannot take 2000 steps"),
        ("model.channel_mult", "('a',)", r"'model.channel_mult' expects a tuple of int"),
        ("model.patch_size", "0", r"'model.patch_size' is 0; it must be at least 1"),
        ("diffusion.timestep_power", "0", r"'diffusion.timestep_power' is 0.0; it must be > 0"),
        ("diffusion.edge_weight", "-1", r"'diffusion.edge_weight' is -1.0; it must be >= 0"),
    ],
)
def test_out_of_range_values_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_spec("decoder", "tiny"), {key: value})


def test_edge_weights_are_for_images_not_the_priors_embeddings():
    with pytest.raises(ConfigError, match=r"'diffusion.edge_weight' is 2.0; .* 0 for the prior"):
        load_config(_spec("prior", "tiny"), {"diffusion.edge_weight": "2"})


def test_value_outside_its_choices_is_named_with_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"'diffusion.prediction' is 'epsilon'; valid values: eps, x0, v"
    ):
        load_config(_spec("prior", "tiny"), {"diffusion.prediction": "epsilon"})


def test_karlo_sampling_takes_a_number_of_steps():
    assert load_config(_spec("decoder", "karlo")).sampling.method == "karlo"
    with pytest.raises(ConfigError, match=r"'sampling.steps' is 'ddim25': sampling method 'karlo'"):
        load_config(_spec("decoder", "karlo"), {"sampling.steps": "ddim25"})
    with pytest.raises(ConfigError, match=r"'sampling.uncond_text' is 'none'; valid values: drop"):
        load_config(_spec("prior", "tiny"), {"sampling.uncond_text": "none"})


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(
        ConfigError,
        match=r"unknown decoder config variant 'huge'; valid variants: karlo, paper, shapes, tiny",
    ):
        load_config(_spec("decoder", "huge"))


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match=r"config file not found: 'configs/nope\.py'"):
        load_config("configs/nope.py:tiny")


@pytest.mark.parametrize("stage", STAGES)
def test_every_sweep_point_is_a_valid_config(stage):
    points = list(iterate_sweep(_spec(stage, "tiny")))
    assert len(points) >= 2
    for overrides, config in points:
        for key, value in overrides.items():
            head, leaf = key.rsplit(".", 1)
            assert config[head][leaf] == value
    assert len({json.dumps(o, sort_keys=True) for o, _ in points}) == len(points)


def test_override_args_are_parsed_in_both_spellings():
    got = parse_override_args(["--config.train.steps=5", "--config.optim.lr", "0.1"])
    assert got == {"train.steps": "5", "optim.lr": "0.1"}
    with pytest.raises(ConfigError, match="unexpected argument '--steps=5'"):
        parse_override_args(["--steps=5"])


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "unclip_jax", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_cli_prints_the_overridden_config():
    run = _cli("config", "--config", "configs/decoder.py:tiny", "--config.train.batch_size=16")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["train"]["batch_size"] == 16


def test_cli_reports_a_bad_override_and_exits_2():
    run = _cli("config", "--config", "configs/decoder.py:tiny", "--config.train.bsz=16")
    assert run.returncode == 2
    assert "unknown config key 'train.bsz'" in run.stderr and "batch_size" in run.stderr


def test_cli_help_lists_the_subcommands():
    from unclip_jax.cli import COMMANDS

    run = _cli("--help")
    assert run.returncode == 0
    for command in COMMANDS:
        assert command.name in run.stdout


def test_cli_train_names_an_unregistered_stage(tmp_path):
    run = _cli(
        "train",
        "--config",
        "configs/decoder.py:tiny",
        "--config.stage=nonesuch",
        "--workdir",
        str(tmp_path),
    )
    assert run.returncode == 2
    assert "no trainable stage 'nonesuch' is registered" in run.stderr
    assert "clip, decoder, prior, upsampler" in run.stderr  # the registered ones are listed


def test_cli_train_decoder_without_a_clip_names_the_key(tmp_path):
    run = _cli("train", "--config", "configs/decoder.py:tiny", "--workdir", str(tmp_path))
    assert run.returncode == 2
    assert "'clip.dir' is empty" in run.stderr
