"""The cascade on tiny random-weight stages: determinism by seed, sharded resumable generation
(one process and two), guidance reaching the models, inversion, interpolation, text diffs,
variations, and the errors a wrong pipeline gets."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from cascade_fixture import write_random_cascade
from clip_fixture import ROOT
from PIL import Image

from unclip_jax.config import ConfigError, load_config
from unclip_jax.sampling import manipulate as M
from unclip_jax.sampling.cascade import Cascade, image_keys, parse_settings, read_pipeline
from unclip_jax.sampling.generate import generate_to_dir, image_name
from unclip_jax.sampling.load import read_stage

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = ["a red circle", "a small blue square", "a green triangle on white", "a purple star"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_random_cascade(str(tmp_path_factory.mktemp("cascade")))


@pytest.fixture(scope="module")
def cascade(pipeline):
    return Cascade(read_pipeline([pipeline]))


def _images(folder):
    return {
        f: np.asarray(Image.open(os.path.join(folder, f)))
        for f in sorted(os.listdir(folder))
        if f.startswith("P") and f.endswith(".png")
    }


def _manifest(folder):
    with open(os.path.join(folder, "manifest.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_the_same_seed_gives_the_same_images_whatever_the_batch_size(cascade, tmp_path):
    a = generate_to_dir(cascade, PROMPTS, str(tmp_path / "a"), n=2, seed=3, batch_size=8)
    b = generate_to_dir(
        cascade, PROMPTS, str(tmp_path / "b"), n=2, seed=3, batch_size=16, progress=False
    )
    assert a.written == b.written == 8
    first, second = _images(tmp_path / "a"), _images(tmp_path / "b")
    assert sorted(first) == [image_name(p, j) for p in range(4) for j in range(2)]
    for name in first:
        # Another per-device batch runs other kernels: float rounding may move a pixel by a
        # level or two, nothing more.
        diff = np.abs(first[name].astype(int) - second[name])
        assert diff.max() <= 3 and (diff > 0).mean() < 0.01, name
    assert first[name].shape == (32, 32, 3)  # through the 16 -> 32 upsampler
    # Another seed, and another sample of the same prompt, give other images.
    generate_to_dir(cascade, PROMPTS[:1], str(tmp_path / "c"), n=1, seed=4, progress=False)
    other = _images(tmp_path / "c")[image_name(0, 0)]
    assert np.abs(other.astype(int) - first[image_name(0, 0)]).mean() > 1
    assert np.abs(first[image_name(0, 1)].astype(int) - first[image_name(0, 0)]).mean() > 1
    rows = _manifest(tmp_path / "a")
    assert [r["file"] for r in rows] == sorted(first)
    assert rows[3] == {
        "file": image_name(1, 1),
        "prompt": PROMPTS[1],
        "seed": 3,
        "index": 1,
        "sample": 1,
    }
    assert Image.open(tmp_path / "a" / "grid.png").size[0] >= 2 * 32


def test_a_rerun_makes_only_the_missing_images_and_the_same_ones(cascade, tmp_path):
    out = str(tmp_path / "run")
    generate_to_dir(cascade, PROMPTS, out, n=1, seed=0, progress=False)
    before = _images(out)
    os.remove(os.path.join(out, image_name(2, 0)))
    report = generate_to_dir(cascade, PROMPTS, out, n=1, seed=0, progress=False)
    assert (report.written, report.skipped) == (1, 3)
    np.testing.assert_array_equal(_images(out)[image_name(2, 0)], before[image_name(2, 0)])
    assert len(_manifest(out)) == 4
    with pytest.raises(ConfigError, match="other settings"):
        generate_to_dir(cascade, PROMPTS, out, n=1, seed=1, progress=False)
    # Prompts may be added at the end; a changed prompt is refused.
    report = generate_to_dir(cascade, [*PROMPTS, "one more"], out, n=1, seed=0, progress=False)
    assert (report.written, report.skipped) == (1, 4) and len(_manifest(out)) == 5
    with pytest.raises(ConfigError, match="prompt 1 'a small blue square', now 'edited'"):
        edited = [PROMPTS[0], "edited", *PROMPTS[2:]]
        generate_to_dir(cascade, edited, out, n=1, seed=0, progress=False)


def test_a_killed_run_leaves_its_settings_and_no_partial_png(cascade, tmp_path, monkeypatch):
    import unclip_jax.sampling.generate as G

    out = str(tmp_path / "run")

    def killed(path, pixels):
        raise KeyboardInterrupt  # the run dies writing its first image

    monkeypatch.setattr(G, "_write_png", killed)
    with pytest.raises(KeyboardInterrupt):
        generate_to_dir(cascade, PROMPTS, out, n=1, seed=0, progress=False)
    monkeypatch.undo()
    assert not _images(out) and os.path.exists(os.path.join(out, "settings.json"))
    with pytest.raises(ConfigError, match="other settings"):
        generate_to_dir(cascade, PROMPTS, out, n=1, seed=9, progress=False)
    # A stale temporary file of a killed writer is removed by the next run, never read as PNG.
    stale = os.path.join(out, f".{image_name(0, 0)}.tmp-1")
    open(stale, "wb").close()
    assert generate_to_dir(cascade, PROMPTS, out, n=1, seed=0, progress=False).written == 4
    assert not os.path.exists(stale)


def _decode(cascade, prompts, z_i, seed=0):
    tokens = cascade.put(cascade.tokenize(prompts))
    keys = image_keys(seed, cascade.put(np.zeros((len(prompts), 2), np.int32)))
    return np.asarray(cascade.decode(cascade.decoder_cond(cascade.put(z_i), tokens), keys))


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_rows_with_z_i_dropped_are_drawn_from_the_caption_alone(cascade, scale):
    """`drop_image` rows (the decoder's caption-only path) ignore z_i, guided or not; the
    other rows of the same batch still read it."""
    rng = np.random.default_rng(0)
    prompts = ["a red circle", "a blue square"]
    tokens = cascade.put(cascade.tokenize(prompts))
    keys = image_keys(0, cascade.put(np.zeros((2, 2), np.int32)))
    drop = cascade.put(np.array([True, False]))

    def decode(z_i):
        cond = cascade.decoder_cond(cascade.put(z_i), tokens, drop_image=drop)
        return np.asarray(cascade.decode(cond, keys, guidance_scale=scale))

    a, b = (rng.normal(size=(2, 16)).astype(np.float32) for _ in range(2))
    out_a, out_b = decode(a), decode(b)
    np.testing.assert_allclose(out_a[0], out_b[0], atol=1e-5)
    assert np.abs(out_a[1] - out_b[1]).mean() > 1e-3


def test_guidance_min_t_limits_guidance_to_high_noise(cascade):
    rng = np.random.default_rng(1)
    z_i = rng.normal(size=(2, 16)).astype(np.float32)
    tokens = cascade.put(cascade.tokenize(["a red circle", "a blue square"]))
    cond = cascade.decoder_cond(cascade.put(z_i), tokens)
    keys = image_keys(0, cascade.put(np.zeros((2, 2), np.int32)))

    def decode(**sampling):
        return np.asarray(cascade.decode(cond, keys, method="ddim", eta=0.0, **sampling))

    unguided = decode(guidance_scale=1.0)
    # A threshold above every timestep guides no step: the conditional model alone, exactly.
    np.testing.assert_allclose(decode(guidance_scale=3.0, guidance_min_t=1000), unguided, atol=1e-6)
    # Guiding the high-noise steps only is neither (the random decoder's x0 is mostly clipped
    # to +-1, so the images differ in few pixels; the same settings give the same bits).
    every, some = decode(guidance_scale=3.0), decode(guidance_scale=3.0, guidance_min_t=500)
    assert np.abs(some - unguided).max() > 1e-3 and np.abs(some - every).max() > 1e-3
    with pytest.raises(ConfigError, match=r"decoder\.guidance_min_t is -1"):
        parse_settings(["decoder.guidance_min_t=-1"])


def test_guidance_scales_reach_the_decoder_and_the_prior(pipeline):
    rng = np.random.default_rng(0)
    z_i = rng.normal(size=(2, 16)).astype(np.float32)
    prompts = ["a red circle", "a blue square"]
    # At guidance 0 the decoder is its unconditional model: blind to z_i and the caption
    # (DDIM, eta 0: the learned variance, taken from the conditional half, plays no part).
    settings = ["decoder.guidance_scale=0", "decoder.method=ddim", "decoder.eta=0"]
    blind = Cascade(read_pipeline([pipeline]), settings=parse_settings(settings))
    out = _decode(blind, prompts, z_i)
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)
    guided = Cascade(read_pipeline([pipeline]), settings={"decoder": {"guidance_scale": 3.0}})
    out = _decode(guided, prompts, z_i)
    assert np.abs(out[0] - out[1]).mean() > 1e-3

    # The prior likewise (one candidate, so the pick by z_t plays no part).
    def z(scale):
        c = Cascade(
            read_pipeline([pipeline]),
            settings={"prior": {"guidance_scale": scale, "num_candidates": 1}},
        )
        tokens = c.put(c.tokenize(prompts))
        keys = image_keys(0, c.put(np.zeros((2, 2), np.int32)))
        return np.asarray(c.sample_z_i(tokens, keys))

    uncond = z(0.0)
    np.testing.assert_allclose(uncond[0], uncond[1], atol=1e-5)
    cond = z(2.0)
    assert np.abs(cond[0] - cond[1]).mean() > 1e-4

    # And the autoregressive prior's guidance, through its logits.
    def ar(scale):
        c = Cascade(
            read_pipeline([pipeline]), prior="ar", settings={"prior": {"guidance_scale": scale}}
        )
        tokens = c.put(c.tokenize(prompts))
        keys = image_keys(0, c.put(np.zeros((2, 2), np.int32)))
        return np.asarray(c.sample_z_i(tokens, keys))

    uncond = ar(0.0)
    np.testing.assert_allclose(uncond[0], uncond[1], atol=1e-5)
    assert np.abs(ar(3.0)[0] - uncond[0]).max() > 1e-3


def test_inversion_then_eta_0_decoding_reconstructs_the_image(cascade):
    # The tiny decoder's own settings: guided at scale 3, the default fixed-point iterations.
    images = [np.random.default_rng(i).integers(0, 256, (24, 20, 3), np.uint8) for i in (0, 1)]
    inverted = M.invert(cascade, images)
    assert inverted.x_T.shape == (2, 16, 16, 3)
    # The images come back to within a uint8 level (1/127.5 = 7.8e-3) everywhere...
    error = np.abs(M.reconstruct(cascade, inverted) - inverted.x0)
    assert error.max() < 7.8e-3 and error.mean() < 1e-3, (error.max(), error.mean())
    # ...while the other image's x_T decodes far from it: x_T carries the image.
    swapped = M.Inverted(z_i=inverted.z_i, x_T=inverted.x_T[::-1], x0=inverted.x0)
    assert np.abs(M.reconstruct(cascade, swapped) - inverted.x0).mean() > 0.1


def test_x0_estimate_is_the_image_at_low_noise_and_not_at_high(cascade):
    images = [np.random.default_rng(i).integers(0, 256, (16, 16, 3), np.uint8) for i in (0, 1)]
    inputs = cascade.put(cascade.image_inputs(images))
    x0, z_i = inputs["x0"], cascade.image_embeddings(inputs["clip_pixels"])
    cond = cascade.decoder_cond(z_i, cascade.put(cascade.tokenize(PROMPTS[:2])))
    keys = jax.random.split(jax.random.key(0), 2)

    def estimate(t, c=cond):
        return np.asarray(cascade.predict_x0(c, x0, cascade.put(np.full(2, t, np.int32)), keys))

    low, high = estimate(0), estimate(999)
    assert low.shape == high.shape == (2, 16, 16, 3)
    # At t = 0 x_t is x0 plus noise of s.d. sqrt(1 - abar_0) ~ 6e-3, and the estimate removes
    # about that much whatever the (random) model predicts: within a few uint8 levels of x0.
    assert np.abs(low - np.asarray(x0)).max() < 0.1
    # At t = 999 (abar ~ 2e-9) nothing of x0 is left to read: a random model's estimate is not it.
    assert np.abs(high - np.asarray(x0)).mean() > 0.1
    np.testing.assert_array_equal(estimate(0), low)  # the noise comes from the keys alone
    # It is the decoder's estimate on its conditioning, not x_t rescaled: the other image's
    # z_i moves it (by ~2e-4 in this random tiny decoder; the same inputs give the same bits).
    swapped = cascade.decoder_cond(z_i[::-1], cascade.put(cascade.tokenize(PROMPTS[:2])))
    assert np.abs(estimate(500, swapped) - estimate(500)).max() > 2e-5


def test_interpolation_and_text_diff_strips_have_the_asked_length(cascade, tmp_path):
    generate_to_dir(cascade, PROMPTS[:2], str(tmp_path / "g"), n=1, seed=0, progress=False)
    a, b = _images(tmp_path / "g").values()
    frames = M.interpolate(cascade, a, b, steps=5)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    assert np.abs(frames[0].astype(int) - frames[-1]).mean() > 1  # it goes somewhere
    fixed = M.interpolate(cascade, a, b, steps=3, noise="fixed")
    assert fixed.shape == (3, 32, 32, 3)
    diff = M.text_diff(cascade, a, source="a red circle", target="a blue square", steps=4)
    assert diff.shape == (4, 32, 32, 3)
    # theta 0 is the image itself: the text diff's first frame is the interpolation's first
    # (up to a level of rounding: the batches differ).
    assert np.abs(diff[0].astype(int) - frames[0]).max() <= 2
    paths = M.write_strip(diff, str(tmp_path / "s"), "textdiff")
    assert len(paths) == 5 and Image.open(paths[0]).size == (4 * 32, 32)


def test_variations_are_several_and_differ(cascade, tmp_path):
    generate_to_dir(cascade, PROMPTS[:2], str(tmp_path), n=1, seed=0, progress=False)
    images = list(_images(tmp_path).values())
    out = M.variations(cascade, images, n=3, seed=0, eta=1.0)
    assert out.shape == (2, 3, 32, 32, 3)
    assert np.abs(out[0, 0].astype(int) - out[0, 1]).mean() > 1
    again = M.variations(cascade, images[:1], n=3, seed=0, eta=1.0)
    np.testing.assert_array_equal(again[0], out[0])


def test_slerp_keeps_the_ends_and_the_norm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 8))
    a, b = a / np.linalg.norm(a), 3 * b / np.linalg.norm(b)
    path = np.asarray(M.slerp(np.stack([a] * 5), np.stack([b] * 5), np.linspace(0, 1, 5)))
    np.testing.assert_allclose(path[0], a, atol=1e-6)
    np.testing.assert_allclose(path[-1], b, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), np.linspace(1, 3, 5), rtol=1e-5)
    # Equal angular steps.
    cos = [
        np.dot(path[i], path[i + 1]) / np.linalg.norm(path[i]) / np.linalg.norm(path[i + 1])
        for i in range(4)
    ]
    np.testing.assert_allclose(cos, cos[0], atol=1e-5)


def test_the_autoregressive_prior_is_chosen_by_name(pipeline, tmp_path):
    c = Cascade(read_pipeline([pipeline]), prior="ar")
    assert c.prior_kind == "autoregressive"
    report = generate_to_dir(c, PROMPTS[:2], str(tmp_path), n=1, seed=0, progress=False)
    assert report.written == 2
    with pytest.raises(ConfigError, match="no prior named 'nope'"):
        Cascade(read_pipeline([pipeline]), prior="nope")


def test_a_training_workdir_is_a_stage(pipeline, tmp_path):
    from unclip_jax.training import train_and_evaluate

    config = load_config(
        f"{ROOT}/configs/upsampler.py:tiny",
        {"model.low_resolution": 16, "model.resolution": 32, "train.steps": 2},
    )
    train_and_evaluate(config, str(tmp_path / "up"))
    root = os.path.dirname(pipeline)
    spec = read_pipeline(
        [os.path.join(root, "decoder"), str(tmp_path / "up"), os.path.join(root, "prior")]
    )
    assert spec.upsamplers == (str(tmp_path / "up"),) and list(spec.priors) == ["diffusion"]
    c = Cascade(spec, settings={"upsampler0": {"steps": 2}})
    assert c.upsampler_weights[0].step == 2 and c.resolution == 32
    assert c.settings["upsampler0"]["steps"] == "2"
    assert generate_to_dir(c, PROMPTS[:1], str(tmp_path / "o"), n=1, progress=False).written == 1
    # The workdir packed as a stage directory holds the same EMA params.
    from unclip_jax.cli import main
    from unclip_jax.training.checkpoint import param_paths

    assert (
        main(
            [
                "export",
                "--workdir",
                str(tmp_path / "up"),
                "--out",
                str(tmp_path / "sd"),
                "--stage-dir",
                "--ema",
            ]
        )
        == 0
    )
    packed = read_stage(str(tmp_path / "sd"))
    assert packed.stage == "upsampler" and packed.config.model.resolution == 32
    a, b = param_paths(packed.params), param_paths(c.upsampler_weights[0].params)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    with pytest.raises(ConfigError, match="settings for upsampler1"):
        Cascade(spec, settings={"upsampler1": {"steps": 2}})


def _edit_config(directory, key, value):
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["model"][key] = value
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)


def _write_pipeline(path, **entries):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(entries, f)
    return str(path)


def test_a_wrong_pipeline_is_named(pipeline, tmp_path):
    root = os.path.dirname(pipeline)
    d = lambda name: os.path.join(root, name)  # noqa: E731
    with pytest.raises(ConfigError, match="unknown key 'decodr'"):
        read_pipeline([_write_pipeline(tmp_path / "a.json", decodr=d("decoder"))])
    with pytest.raises(ConfigError, match="'nowhere' does not exist"):
        read_pipeline([_write_pipeline(tmp_path / "b.json", decoder="nowhere")])
    spec = read_pipeline([_write_pipeline(tmp_path / "c.json", decoder=d("prior"))])
    with pytest.raises(ConfigError, match="a prior stage; decoder needs a decoder"):
        Cascade(spec)
    with pytest.raises(ConfigError, match=r"unknown setting decoder\.guidance"):
        parse_settings(["decoder.guidance=2"])
    with pytest.raises(ConfigError, match=r"setting decoder\.eta is 'abc', not a float"):
        parse_settings(["decoder.eta=abc"])
    with pytest.raises(ConfigError, match="'upsamplers' a list of paths"):
        read_pipeline([_write_pipeline(tmp_path / "d.json", decoder=d("decoder"), upsamplers=[1])])
    with pytest.raises(ConfigError, match=r"upsampler 0 .* takes 8 px images, but the stage "):
        tiny_up = str(tmp_path / "up8")
        shutil.copytree(d("upsampler"), tiny_up)
        _edit_config(tiny_up, "low_resolution", 8)
        Cascade(read_pipeline([d("decoder"), tiny_up]))
    # Params from another config: the first misfit param is named.
    wide = str(tmp_path / "wide")
    shutil.copytree(d("decoder"), wide)
    _edit_config(wide, "channels", 24)
    with pytest.raises(ConfigError, match="do not fit its config: param"):
        Cascade(read_pipeline([wide]))
    # The AR prior without its codec file.
    broken = str(tmp_path / "ar")
    shutil.copytree(d("prior_ar"), broken)
    os.remove(os.path.join(broken, "prior_codec.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no prior_codec\.safetensors"):
        Cascade(read_pipeline([d("decoder"), broken]))


def test_the_cli_samples_and_says_what_is_wrong(pipeline, tmp_path):
    from unclip_jax.cli import main

    out = str(tmp_path / "out")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    args = [
        "sample",
        "--pipeline",
        pipeline,
        "--prompt-file",
        str(prompts),
        "--n",
        "1",
        "--out",
        out,
        "--compile-cache",
        "off",
        "--set",
        "decoder.steps=3",
    ]
    assert main(args) == 0
    assert sorted(_images(out)) == [image_name(0, 0), image_name(1, 0)]
    with open(os.path.join(out, "settings.json"), encoding="utf-8") as f:
        assert json.load(f)["cascade"]["settings"]["decoder"]["steps"] == "3"
    assert main([*args[:-2], "--set", "decoder.stepz=3"]) == 2
    assert (
        main(["sample", "--pipeline", str(tmp_path / "none"), "--prompt", "x", "--out", out]) == 2
    )


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_write_each_image_once_and_the_images_of_one(cascade, pipeline, tmp_path):
    prompts = [f"prompt number {i}" for i in range(11)]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts))
    one = str(tmp_path / "one")
    generate_to_dir(cascade, prompts, one, n=1, seed=5, batch_size=8, progress=False)

    two = str(tmp_path / "two")
    coordinator = f"localhost:{_free_port()}"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }
    base = [
        sys.executable,
        "-m",
        "unclip_jax",
        "sample",
        "--pipeline",
        pipeline,
        "--prompt-file",
        str(prompt_file),
        "--n",
        "1",
        "--seed",
        "5",
        "--batch-size",
        "8",
        "--out",
        two,
        "--compile-cache",
        "off",
        "--distributed",
        "--coordinator",
        coordinator,
        "--num-processes",
        "2",
    ]
    procs = [
        subprocess.Popen(
            [*base, "--process-id", str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    written = [int(o.split("wrote ")[-1].split(" images")[0]) for o in outs]
    assert sum(written) == 11 and all(w > 0 for w in written)  # each once, both wrote
    a, b = _images(one), _images(two)
    assert sorted(b) == [image_name(p, 0) for p in range(11)]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert len(_manifest(two)) == 11


def test_a_setting_outside_its_choices_is_named():
    with pytest.raises(ConfigError, match=r"decoder\.uncond_text is 'nothing'; valid values: drop"):
        parse_settings(["decoder.uncond_text=nothing"])
    with pytest.raises(ConfigError, match=r"prior\.method is 'euler'; valid values: ddpm, ddim"):
        parse_settings(["prior.method=euler"])
    assert parse_settings(["upsampler.method=karlo"]) == {"upsampler": {"method": "karlo"}}
