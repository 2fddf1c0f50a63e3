"""`unclip-jax convert karlo` and the "karlo" sampler against diffusers' unCLIP, end to end.

A random Karlo in diffusers' layout (every module of `UnCLIPPipeline` built from configs at a
tiny size, weights perturbed so that every tensor takes part, written with `save_pretrained`;
a BPE tokenizer of its own, nothing downloaded) is converted with the command line, then:
- each converted module equals its diffusers original on the same inputs (max |diff| 1e-4);
- `.bin` files convert to the same params as safetensors; a missing, unused or misshaped tensor
  and a config our modules cannot express are errors naming them;
- `D.karlo_schedule` steps as `UnCLIPScheduler.step` does, for each of its variances;
- `UnCLIPPipeline` and our cascade on the converted files, fed the same noise, make the same
  images (25/25/7 steps, guidance 4 and 8: mean |diff| 2e-5, where 1e-3 was asked for), and
  `unclip-jax sample` samples the converted pipeline.
The "bench"-size module parity is behind the `slow` marker. Needs the `peers` extra.
"""

import functools
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the peers extra: pip install -e '.[peers]'")
diffusers = pytest.importorskip(
    "diffusers", reason="needs the peers extra: pip install -e '.[peers]'"
)
transformers = pytest.importorskip(
    "transformers", reason="needs the peers extra: pip install -e '.[peers]'"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel  # noqa: E402
from diffusers.schedulers import scheduling_unclip  # noqa: E402
from test_karlo_parity import _randomise  # noqa: E402

from unclip_jax import diffusion as D  # noqa: E402
from unclip_jax.cli import main  # noqa: E402
from unclip_jax.clip import load_pretrained  # noqa: E402
from unclip_jax.config import ConfigError  # noqa: E402
from unclip_jax.convert.hf_clip import CheckpointKeyError  # noqa: E402
from unclip_jax.convert.karlo import convert_karlo  # noqa: E402
from unclip_jax.convert.torch_bin import TorchBinError, read_torch_bin  # noqa: E402
from unclip_jax.models.builders import (  # noqa: E402
    decoder_from_config,
    prior_from_config,
    upsampler_from_config,
)
from unclip_jax.models.clip_tokenizer import ClipTokenizer  # noqa: E402
from unclip_jax.models.unet import upsampler_input  # noqa: E402
from unclip_jax.sampling.cascade import (  # noqa: E402
    DECODER_STREAM,
    PRIOR_STREAM,
    UPSAMPLER_STREAM,
    Cascade,
    image_keys,
    read_pipeline,
)
from unclip_jax.sampling.load import read_stage  # noqa: E402

pytestmark = pytest.mark.peers

# float32 both sides, the same ops in another order (NCHW vs NHWC convolutions, batched
# matmuls): ~1e-6 of the output's scale; a wrong op, layout or param is O(1).
MODULE_ATOL = 1e-4
# The whole pipeline, 57 sampling steps of three models at guidance 4 and 8 (which multiply the
# rounding differences of the guided outputs), then the final image in [0, 1]: 5.8e-7 mean
# measured. The bar asked for is 1e-3; 2e-5 is kept so that the test tells Karlo's schedule from
# a near miss: our float64 schedule on the same timesteps ("ddpm", "25") is 6.1e-4 away, the
# caption dropped instead of the empty caption's encoding 0.10.
PIPELINE_MEAN_ATOL = 2e-5

PROMPTS = ["a small red circle in the top left", "a large blue square on a white background"]
TINY = dict(
    text=dict(hidden=32, layers=2, heads=2, positions=16),
    prior=dict(heads=2, head_dim=12, layers=2),
    decoder=dict(res=16, channels=(32, 64), layers=1, head_dim=16, cross=48, groups=8),
    super_res=dict(res=64, channels=(32, 64), layers=1, groups=8),
)
# The benchmarks' "bench" size (benchmarks/decoder_train.py, prior_train.py): 64 px, channels
# 64..256, 2 res blocks, attention at 16 and 8 px with head dim 64; a 6-layer width-512 prior;
# 512-d embeddings and 77 caption tokens; super-res 64 -> 256 px on the decoder's channels.
BENCH = dict(
    text=dict(hidden=512, layers=2, heads=8, positions=77),
    prior=dict(heads=8, head_dim=64, layers=6),
    decoder=dict(res=64, channels=(64, 128, 192, 256), layers=2, head_dim=64, cross=512, groups=32),
    super_res=dict(res=256, channels=(64, 128, 192, 256), layers=2, groups=32),
)


# ---- a random Karlo in diffusers' layout -------------------------------------------------------


def _tokenizer(length):
    captions = [*PROMPTS, "a small green triangle", "a large red square in the center"] * 4
    tok = ClipTokenizer.train(captions, vocab_size=600, min_frequency=1)
    tok.model_max_length = length
    return tok


def karlo_pipeline(size, seed=0):
    """An `UnCLIPPipeline` with Karlo's layout at `size`, random weights, Karlo's schedulers."""
    t, p, d, s = size["text"], size["prior"], size["decoder"], size["super_res"]
    dim = t["hidden"]
    tok = _tokenizer(t["positions"])
    torch.manual_seed(seed)
    text_encoder = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(
            vocab_size=tok.vocab_size,
            hidden_size=dim,
            intermediate_size=2 * dim,
            num_hidden_layers=t["layers"],
            num_attention_heads=t["heads"],
            max_position_embeddings=t["positions"],
            projection_dim=dim,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
        )
    )
    prior = diffusers.PriorTransformer(
        num_attention_heads=p["heads"],
        attention_head_dim=p["head_dim"],
        num_layers=p["layers"],
        embedding_dim=dim,
        num_embeddings=t["positions"],
        additional_embeddings=4,
    )
    levels = len(d["channels"])
    down = ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * (levels - 1)
    decoder = diffusers.UNet2DConditionModel(
        sample_size=d["res"],
        in_channels=3,
        out_channels=6,
        layers_per_block=d["layers"],
        block_out_channels=d["channels"],
        down_block_types=down,
        up_block_types=[
            "SimpleCrossAttnUpBlock2D" if "Attn" in b else "ResnetUpsampleBlock2D"
            for b in down[::-1]
        ],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=d["cross"],
        attention_head_dim=d["head_dim"],
        class_embed_type="identity",
        resnet_time_scale_shift="scale_shift",
        norm_num_groups=d["groups"],
    )
    text_proj = UnCLIPTextProjModel(
        clip_extra_context_tokens=4,
        clip_embeddings_dim=dim,
        time_embed_dim=4 * d["channels"][0],
        cross_attention_dim=d["cross"],
    )

    def super_res():
        return diffusers.UNet2DModel(
            sample_size=s["res"],
            in_channels=6,
            out_channels=3,
            layers_per_block=s["layers"],
            block_out_channels=s["channels"],
            down_block_types=["ResnetDownsampleBlock2D"] * len(s["channels"]),
            up_block_types=["ResnetUpsampleBlock2D"] * len(s["channels"]),
            add_attention=False,
            norm_num_groups=s["groups"],
        )

    modules = dict(
        text_encoder=text_encoder,
        prior=prior,
        decoder=decoder,
        text_proj=text_proj,
        super_res_first=super_res(),
        super_res_last=super_res(),
    )
    for i, module in enumerate(modules.values()):
        _randomise(module, seed=100 * seed + i)
    with torch.no_grad():  # a std must be positive to be one
        prior.clip_std.copy_(prior.clip_std.abs() + 0.5)
    return modules, tok


def save_karlo(root, modules, tok, *, safe=True):
    """`UnCLIPPipeline.save_pretrained`'s layout, with Karlo's scheduler configs."""
    pipe = diffusers.UnCLIPPipeline(
        **modules,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(_tokenizer_dir(root, tok)),
        prior_scheduler=diffusers.UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0
        ),
        decoder_scheduler=diffusers.UnCLIPScheduler(
            variance_type="learned_range", prediction_type="epsilon"
        ),
        super_res_scheduler=diffusers.UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="epsilon"
        ),
    )
    pipe.save_pretrained(root, safe_serialization=safe)
    return pipe


def _tokenizer_dir(root, tok):
    path = f"{root}_tokenizer"
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers pipeline, its directory, the converted directory): converted with the CLI."""
    root = tmp_path_factory.mktemp("karlo")
    modules, tok = karlo_pipeline(TINY)
    pipe = save_karlo(str(root / "diffusers"), modules, tok)
    out = str(root / "converted")
    assert main(["convert", "karlo", "--src", str(root / "diffusers"), "--out", out]) == 0
    return pipe, str(root / "diffusers"), out


# ---- module parity -------------------------------------------------------------------------


def _close(ours, ref, what):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    assert scale > 1e-2, f"{what}: the reference output is ~0, the check would be vacuous"
    assert err <= MODULE_ATOL, f"{what}: max |diff| {err:.3g} at output scale {scale:.3g}"
    return err


def _nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def _nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def module_parity(pipe, out, seed=0):
    """{module: max |ours - diffusers|} of every converted module on random inputs."""
    rng = np.random.default_rng(seed)
    errors = {}
    clip = load_pretrained(os.path.join(out, "clip"))
    ids, mask = clip.tokenize(PROMPTS)
    with torch.no_grad():
        ref = pipe.text_encoder(torch.from_numpy(ids.astype(np.int64)))
    z_t, states = clip.model.apply(
        {"params": clip.params}, ids, mask, method="encode_text_and_states"
    )
    errors["text_encoder (text_embeds)"] = _close(z_t, ref.text_embeds.numpy(), "text_embeds")
    valid = mask.astype(bool)  # padded positions differ by design: masked downstream
    errors["text_encoder (states)"] = _close(
        np.asarray(states)[valid], ref.last_hidden_state.numpy()[valid], "text states"
    )

    b, length, dim = len(PROMPTS), clip.config.context_length, clip.config.projection_dim
    text_states = rng.standard_normal((b, length, dim)).astype(np.float32)
    z_t = rng.standard_normal((b, dim)).astype(np.float32)
    t = np.array([3, 717])

    stage = read_stage(os.path.join(out, "prior"))
    prior = prior_from_config(stage.config, vocab_size=clip.config.text.vocab_size)
    x_t = rng.standard_normal((b, dim)).astype(np.float32)
    with torch.no_grad():
        ref = pipe.prior(
            torch.from_numpy(x_t),
            timestep=torch.from_numpy(t),
            proj_embedding=torch.from_numpy(z_t),
            encoder_hidden_states=torch.from_numpy(text_states),
            attention_mask=torch.from_numpy(valid),
        ).predicted_image_embedding.numpy()
    ours = jax.jit(prior.apply)({"params": stage.params}, x_t, t, z_t, text_states, valid)
    errors["prior"] = _close(ours, ref, "prior")

    stage = read_stage(os.path.join(out, "decoder"))
    decoder = decoder_from_config(stage.config.model.to_dict())
    res = stage.config.model.resolution
    x = rng.standard_normal((b, 3, res, res)).astype(np.float32)
    z_i = rng.standard_normal((b, dim)).astype(np.float32)
    with torch.no_grad():
        context, emb = pipe.text_proj(
            image_embeddings=torch.from_numpy(z_i[1:]),
            prompt_embeds=torch.from_numpy(z_t),
            text_encoder_hidden_states=torch.from_numpy(text_states),
            do_classifier_free_guidance=True,  # row 0: the learned null embedding
        )
        ref = pipe.decoder(
            torch.from_numpy(x),
            torch.from_numpy(t),
            encoder_hidden_states=context,
            class_labels=emb,
            attention_mask=torch.nn.functional.pad(torch.from_numpy(valid), (4, 0), value=True),
        ).sample.numpy()
    ours = jax.jit(functools.partial(decoder.apply, drop_image=jnp.array([True, False])))(
        {"params": stage.params},
        _nhwc(x),
        t,
        z_i,
        z_t,
        text_states,
        valid,
    )
    errors["text_proj + decoder"] = _close(_nchw(ours), ref, "decoder")

    stage = read_stage(os.path.join(out, "upsampler"))
    pair = upsampler_from_config(stage.config.model.to_dict())
    res = stage.config.model.resolution
    x = rng.standard_normal((b, 6, res, res)).astype(np.float32)
    for name, last in (("super_res_first", False), ("super_res_last", True)):
        with torch.no_grad():
            ref = getattr(pipe, name)(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
        ours = jax.jit(functools.partial(pair.apply, last=last))(
            {"params": stage.params}, _nhwc(x), t
        )
        errors[name] = _close(_nchw(ours), ref, name)
    return errors


def test_every_converted_module_equals_diffusers(tiny):
    pipe, _, out = tiny
    errors = module_parity(pipe, out)
    print("tiny:", {k: f"{v:.2g}" for k, v in errors.items()})


@pytest.mark.slow
def test_every_converted_module_equals_diffusers_at_the_bench_size(tmp_path):
    modules, tok = karlo_pipeline(BENCH, seed=1)
    pipe = save_karlo(str(tmp_path / "diffusers"), modules, tok)
    convert_karlo(str(tmp_path / "diffusers"), str(tmp_path / "converted"))
    errors = module_parity(pipe, str(tmp_path / "converted"), seed=1)
    print("bench:", {k: f"{v:.2g}" for k, v in errors.items()})


def test_bin_files_convert_to_the_same_params(tiny, tmp_path):
    pipe, _, out = tiny
    pipe.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert os.path.isfile(tmp_path / "bin" / "decoder" / "diffusion_pytorch_model.bin")
    convert_karlo(str(tmp_path / "bin"), str(tmp_path / "converted"))
    for stage in ("prior", "decoder", "upsampler"):
        a = read_stage(os.path.join(out, stage)).params
        b = read_stage(str(tmp_path / "converted" / stage)).params
        jax.tree.map(np.testing.assert_array_equal, a, b)
    a, b = (load_pretrained(p).params for p in (f"{out}/clip", str(tmp_path / "converted/clip")))
    jax.tree.map(np.testing.assert_array_equal, a, b)


# ---- the "karlo" sampler: UnCLIPScheduler's steps --------------------------------------------


@pytest.mark.parametrize("steps", [25, 7, 21, 1000])
def test_karlo_spacing_is_unclip_schedulers(steps):
    scheduler = diffusers.UnCLIPScheduler()
    scheduler.set_timesteps(steps)
    assert D.karlo_timesteps(1000, steps) == sorted(scheduler.timesteps.tolist())


@pytest.mark.parametrize(
    "variance, prediction, clip",
    [("fixed_small_log", "sample", 5.0), ("learned_range", "epsilon", 1.0)],
)
def test_karlo_steps_are_unclip_schedulers(variance, prediction, clip, monkeypatch):
    """Every step of D.ddpm_step on D.karlo_schedule, from the same x_t, model output and
    noise, lands where UnCLIPScheduler.step does (to float32 rounding), the last one too."""
    steps = 25
    scheduler = diffusers.UnCLIPScheduler(
        variance_type=variance, prediction_type=prediction, clip_sample_range=clip
    )
    scheduler.set_timesteps(steps)
    sched = D.karlo_schedule(1000, steps)
    rng = np.random.default_rng(0)
    shape = (2, 3, 8, 8)
    channels = 6 if variance == "learned_range" else 3
    timesteps = scheduler.timesteps.tolist()
    worst = 0.0
    drawn = []
    monkeypatch.setattr(
        scheduling_unclip, "randn_tensor", lambda *a, **k: torch.from_numpy(drawn[-1])
    )
    for i, t in enumerate(timesteps):
        x = rng.standard_normal(shape).astype(np.float32)
        out = rng.standard_normal((2, channels, 8, 8)).astype(np.float32)
        if channels == 6:
            out[:, 3:] = np.tanh(out[:, 3:])  # the variance interpolation, in [-1, 1]
        noise = rng.standard_normal(shape).astype(np.float32)
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
        drawn.append(noise)
        ref = scheduler.step(torch.from_numpy(out), t, torch.from_numpy(x), prev_timestep=prev)
        k = steps - 1 - i
        assert int(sched.timesteps[k]) == t
        ours, _ = D.ddpm_step(
            output=_nhwc(out),
            x_t=_nhwc(x),
            t=jnp.full((2,), k),
            noise=_nhwc(noise),
            sched=sched,
            prediction={"sample": "x0", "epsilon": "eps"}[prediction],
            variance={"fixed_small_log": "fixed_small"}.get(variance, variance),
            clip=clip,
        )
        want = ref.prev_sample.numpy()
        err = np.abs(_nchw(ours) - want).max() / max(1.0, np.abs(want).max())
        worst = max(worst, float(err))
    # Float32 rounding of the same formulas: 1.4e-7 (fixed_small_log) and 1.6e-7
    # (learned_range) measured. The float64 schedule of `make_schedule(..., "25")` differs by
    # up to 5.3e-4 (the last step's x0 coefficient is 0.99947 in the scheduler's float32).
    assert worst < 1e-6, f"{variance}: worst relative step difference {worst:.3g}"


# ---- the whole pipeline ------------------------------------------------------------------------


def _our_noise(keys, stream, shape, steps, *, prior=False):
    """(x_T, {step: noise}) that our stage sampler draws for the image keys (stages.py):
    fold_in(key, stream), for the prior each row's one candidate fold_in(row, 0), then
    x_T from fold_in(key, 0) and step s's noise from fold_in(fold_in(key, 1), s)."""
    keys = D.fold_in(keys, stream)
    if prior:
        keys = jax.vmap(lambda row: jax.random.fold_in(row, 0))(keys)
    x_T = D.row_normal(D.fold_in(keys, 0), shape)
    loop = D.fold_in(keys, 1)
    return np.asarray(x_T), {
        s: np.asarray(D.row_normal(D.fold_in(loop, s), shape)) for s in range(steps)
    }


def test_the_converted_cascade_makes_diffusers_images(tiny, monkeypatch):
    """UnCLIPPipeline and `Cascade` on the converted files, Karlo's defaults (25 prior steps at
    guidance 4, 25 decoder steps at guidance 8, 7 super-res steps), the same noise fed to both:
    the same z_i, the same upscaled decoder images and the same final images."""
    pipe, _, out = tiny
    cascade = Cascade(read_pipeline([os.path.join(out, "pipeline.json")]))
    settings = cascade.settings
    assert (settings["prior"]["steps"], settings["prior"]["guidance_scale"]) == ("25", 4.0)
    assert (settings["decoder"]["steps"], settings["decoder"]["guidance_scale"]) == ("25", 8.0)
    assert settings["upsampler0"]["steps"] == "7"
    n = len(PROMPTS)
    tokens = cascade.put(cascade.tokenize(PROMPTS))
    keys = image_keys(0, cascade.put(np.stack([np.arange(n), np.zeros(n)], 1).astype(np.int32)))
    z_i = np.asarray(cascade.sample_z_i(tokens, keys))
    small = cascade.decode(cascade.decoder_cond(z_i, tokens), keys)
    images = np.asarray(cascade.upsample(small, keys))

    # The same noise into diffusers: the starting latents, and each scheduler step's draw.
    dim, res = cascade.clip.config.projection_dim, cascade.decoder_resolution
    prior_T, prior_noise = _our_noise(keys, PRIOR_STREAM, (n, dim), 25, prior=True)
    dec_T, dec_noise = _our_noise(keys, DECODER_STREAM, (n, res, res, 3), 25)
    sr_T, sr_noise = _our_noise(keys, UPSAMPLER_STREAM, (n, 4 * res, 4 * res, 3), 7)
    # The scheduler draws at every step but the last (t = 0): our steps N-1 .. 1, in order.
    queue = [prior_noise[s] for s in range(24, 0, -1)]
    queue += [_nchw(dec_noise[s]) for s in range(24, 0, -1)]
    queue += [_nchw(sr_noise[s]) for s in range(6, 0, -1)]
    queue.reverse()

    def draw(shape, **_):
        noise = queue.pop()
        assert tuple(shape) == noise.shape
        return torch.from_numpy(np.array(noise))  # a writable copy

    # What diffusers' pipeline passes between stages, recorded on the way.
    seen = {}
    post_process = pipe.prior.post_process_latents
    super_res = pipe.super_res_first.forward

    def record_z_i(latents):
        seen["z_i"] = post_process(latents).numpy()
        return post_process(latents)

    def record_upscaled(sample, timestep, **kw):
        seen.setdefault("upscaled", sample[:, 3:].numpy().copy())
        return super_res(sample, timestep, **kw)

    monkeypatch.setattr(scheduling_unclip, "randn_tensor", draw)
    monkeypatch.setattr(pipe.prior, "post_process_latents", record_z_i)
    monkeypatch.setattr(pipe.super_res_first, "forward", record_upscaled)
    ref = pipe(
        PROMPTS,
        prior_latents=torch.from_numpy(prior_T.copy()),
        decoder_latents=torch.from_numpy(_nchw(dec_T).copy()),
        super_res_latents=torch.from_numpy(_nchw(sr_T).copy()),
        output_type="np",
    ).images
    assert not queue, f"{len(queue)} noise draws left over"

    upscaled = upsampler_input(jnp.zeros((n, 4 * res, 4 * res, 3)), jnp.clip(small, -1, 1))
    ours = np.clip((images + 1) / 2, 0, 1)
    errors = {
        "z_i (max)": np.abs(z_i - seen["z_i"]).max(),
        "upscaled decoder images (max)": np.abs(_nchw(upscaled)[:, 3:] - seen["upscaled"]).max(),
        "final images (max)": np.abs(ours - ref).max(),
        "final images (mean)": np.abs(ours - ref).mean(),
    }
    print({k: f"{v:.3g}" for k, v in errors.items()})
    # Not vacuous: the decoder's images are not saturated by the clipping, nor the same for
    # both captions, and the final ones spread over [0, 1].
    assert (np.abs(np.asarray(small)) < 0.99).mean() > 0.2
    assert np.abs(seen["upscaled"][0] - seen["upscaled"][1]).mean() > 0.05
    assert ref.std() > 0.1
    assert errors["z_i (max)"] <= MODULE_ATOL * max(1.0, np.abs(z_i).max())
    # torch's anti-aliased bicubic (Keys a = -0.5, weights renormalised at the borders) is
    # jax's: 2.5e-5 measured, the decoder images' own differences carried through.
    assert errors["upscaled decoder images (max)"] <= 1e-3
    assert errors["final images (mean)"] <= PIPELINE_MEAN_ATOL


def test_the_cli_samples_the_converted_pipeline(tiny, tmp_path):
    _, _, out = tiny
    args = ["sample", "--pipeline", os.path.join(out, "pipeline.json"), "--prompt", PROMPTS[0]]
    # The tests' persistent compilation cache (conftest.py): a rerun does not compile again.
    cache = jax.config.jax_compilation_cache_dir
    args += ["--n", "1", "--batch-size", "8", "--out", str(tmp_path / "images")]
    args += ["--compile-cache", cache]
    assert main(args) == 0
    with open(tmp_path / "images" / "settings.json", encoding="utf-8") as f:
        settings = json.load(f)["cascade"]["settings"]
    assert settings["decoder"]["method"] == "karlo"
    assert settings["decoder"]["uncond_text"] == "empty"
    assert settings["prior"]["num_candidates"] == 1
    from PIL import Image

    (png,) = [p for p in os.listdir(tmp_path / "images") if p.startswith("P")]
    assert Image.open(tmp_path / "images" / png).size == (64, 64)


def test_the_text_tower_loads_in_transformers_and_embeds_no_images(tiny):
    pipe, _, out = tiny
    clip = load_pretrained(os.path.join(out, "clip"))
    assert clip.config.vision is None
    with pytest.raises(ValueError, match="needs a CLIP with a vision tower"):
        clip.encode_image([np.zeros((8, 8, 3), np.uint8)])
    hf = transformers.CLIPTextModelWithProjection.from_pretrained(os.path.join(out, "clip"))
    ids = torch.from_numpy(clip.tokenize(PROMPTS)[0].astype(np.int64))
    with torch.no_grad():
        np.testing.assert_allclose(
            hf(ids).text_embeds.numpy(), pipe.text_encoder(ids).text_embeds.numpy(), atol=1e-6
        )


# ---- what the converter refuses ---------------------------------------------------------------


@pytest.fixture
def source(tiny, tmp_path):
    """A copy of the tiny diffusers directory, to break."""
    _, src, _ = tiny
    shutil.copytree(src, tmp_path / "src")
    return tmp_path / "src"


def _edit_tensors(folder, edit):
    from safetensors.numpy import load_file, save_file

    path = str(folder / "diffusion_pytorch_model.safetensors")
    if not os.path.isfile(path):
        path = str(folder / "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _edit_config(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "folder, edit, message",
    [
        (
            "text_proj",
            lambda sd: sd.pop("embedding_proj.weight"),
            r"text_proj: tensor 'embedding_proj\.weight' is missing \(1 in all\)",
        ),
        (
            "decoder",
            lambda sd: sd.update({"mid_block.attentions.0.to_q.lora": np.ones((2, 2), np.float32)}),
            r"decoder: unexpected tensor 'mid_block\.attentions\.0\.to_q\.lora'",
        ),
        (
            "decoder",
            lambda sd: sd.update({"down_blocks.0.resnets.0.conv3.weight": np.ones((2, 2))}),
            r"tensor 'down_blocks\.0\.resnets\.0\.conv3\.weight' is not used by this U-Net",
        ),
        (
            "super_res_last",
            lambda sd: sd.update({"conv_in.weight": np.zeros((32, 3, 3, 3), np.float32)}),
            r"super_res_last: tensor 'conv_in\.weight' has shape \(32, 3, 3, 3\), the U-Net "
            r"needs \(32, 6, 3, 3\)",
        ),
        ("prior", lambda sd: sd.pop("clip_mean"), r"prior: tensor 'clip_mean' is missing"),
        (
            "text_encoder",
            lambda sd: sd.pop("text_projection.weight"),
            r"text_encoder: tensor 'text_projection\.weight' is missing",
        ),
    ],
)
def test_a_missing_unused_or_misshaped_tensor_is_named(source, tmp_path, folder, edit, message):
    _edit_tensors(source / folder, edit)
    with pytest.raises(CheckpointKeyError, match=message):
        convert_karlo(str(source), str(tmp_path / "out"))


@pytest.mark.parametrize(
    "file, changes, message",
    [
        (
            "decoder/config.json",
            {"resnet_time_scale_shift": "default"},
            r"decoder/config\.json: config key 'resnet_time_scale_shift' is 'default': our "
            r"modules express 'scale_shift' only",
        ),
        (
            "decoder/config.json",
            {"norm_eps": 1e-6},
            r"config key 'norm_eps' is 1e-06: our modules express 1e-05 only",
        ),
        (
            "decoder/config.json",
            {"cross_attention_fusion": True},
            r"config key 'cross_attention_fusion' is not one diffusers' UNet2DConditionModel",
        ),
        (
            "decoder/config.json",
            {"up_block_types": ["ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"]},
            r"config key 'up_block_types' .* our U-Net mirrors the down blocks",
        ),
        (
            "super_res_last/config.json",
            {"layers_per_block": 2},
            r"super_res_last/config\.json: config key 'layers_per_block' is 2: super_res_first "
            r"has 1",
        ),
        (
            "prior/config.json",
            {"norm_in_type": "layer"},
            r"prior/config\.json: config key 'norm_in_type' is 'layer'",
        ),
        (
            "decoder_scheduler/scheduler_config.json",
            {"_class_name": "DDPMScheduler"},
            r"a DDPMScheduler; decoder_scheduler must be a UnCLIPScheduler",
        ),
        (
            "prior_scheduler/scheduler_config.json",
            {"variance_type": "learned_range"},
            r"the prior's variance_type must be fixed_small_log",
        ),
        (
            "text_proj/config.json",
            {"time_embed_dim": 64},
            r"text_proj/config\.json: config key 'time_embed_dim' is 64: the U-Net's is 4 x 32",
        ),
    ],
)
def test_a_config_our_modules_cannot_express_is_named(source, tmp_path, file, changes, message):
    _edit_config(source / file, **changes)
    with pytest.raises(ConfigError, match=message):
        convert_karlo(str(source), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out"), "nothing is written before every config passed"


def test_the_cli_names_what_it_cannot_convert(source, tmp_path, capsys):
    shutil.rmtree(source / "super_res_last")
    assert main(["convert", "karlo", "--src", str(source), "--out", str(tmp_path / "o")]) == 2
    assert "super_res_last/config.json is missing" in capsys.readouterr().err


def test_torch_bin_files_are_read_without_torch(tmp_path):
    base = torch.randn(5, 6)
    state = {
        "w": base,
        "view": base.t()[1:4],  # a strided view of a shared storage
        "half": torch.randn(3).half(),
        "bf16": torch.randn(4, 2).bfloat16(),
        "ids": torch.arange(5),
        "scalar": torch.tensor(3.5),
    }
    torch.save(state, tmp_path / "w.bin")
    read = read_torch_bin(str(tmp_path / "w.bin"))
    for key, value in state.items():
        want = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
        assert read[key].dtype == want.dtype, key
        np.testing.assert_array_equal(read[key], want, err_msg=key)
    torch.save({"module": torch.nn.Linear(2, 2)}, tmp_path / "module.bin")
    with pytest.raises(TorchBinError, match=r"holds a torch\.nn\.modules\.linear\.Linear"):
        read_torch_bin(str(tmp_path / "module.bin"))


def test_karlos_no_caption_is_the_empty_captions_encoding(tiny):
    """With Karlo's `uncond_text` "empty", a row conditioned on z_i alone (`drop_text`: image
    variations) reads the empty caption's encoding, as the unconditional half of guidance
    does, instead of a masked-out caption."""
    from unclip_jax.sampling.stages import _decoder_model_fn

    _, _, out = tiny
    cascade = Cascade(read_pipeline([os.path.join(out, "pipeline.json")]))
    tokens = cascade.tokenize(PROMPTS)
    z_i = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    cond = cascade.decoder_cond(z_i, tokens, drop_text=np.array([True, False]))
    empty = cascade._empty_caption("decoder")
    # Row 0 given the empty caption itself, nothing dropped.
    swapped = {k: v for k, v in cond.items() if k != "drop_text"}
    for name, value in empty.items():
        swapped[name] = np.concatenate([np.asarray(value), np.asarray(cond[name])[1:]])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 16, 3)), jnp.float32)
    t = jnp.array([500, 500])

    @jax.jit
    def guided(c, x, t):
        return _decoder_model_fn(
            cascade.decoder,
            cascade.decoder_params,
            c,
            sampling={"guidance_scale": 8.0},
            variance="learned_range",
        )(x, t)

    with cascade.context():
        out_dropped = guided({**cond, "uncond": empty}, x, t)
        out_swapped = guided({**swapped, "uncond": empty}, x, t)
        out_masked = guided(dict(cond), x, t)  # our own way: the caption masked out
    np.testing.assert_allclose(out_dropped, out_swapped, atol=1e-6)
    assert np.abs(np.asarray(out_masked) - np.asarray(out_dropped))[0].mean() > 1e-2
