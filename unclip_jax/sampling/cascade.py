"""The unCLIP cascade: caption -> CLIP text tower -> prior -> z_i -> decoder -> upsamplers.

A pipeline names the trained stages (`read_pipeline`): a JSON file

    {"clip": "runs/clip/clip",                 # optional: else the prior's clip.dir
     "prior": "runs/prior",                    # or {"diffusion": DIR, "ar": DIR}
     "decoder": "runs/decoder",
     "upsamplers": ["runs/up64", "runs/up256"],
     "settings": {"prior": {"guidance_scale": 2.0}, "decoder": {"steps": "ddim25"}}}

(relative paths are relative to the file), or the stage paths themselves, each one's saved
config saying which slot it fills. `Cascade` loads them onto a mesh (params laid out by their
logical axis names, batches split over the data axes) and runs each stage's jitted sampler.

Randomness is per image: image (p, j) (prompt p, sample j) draws all its noise from
fold_in(fold_in(key(seed), p), j), one fold more per stage, so an image does not depend on
the batch, device or process it was made in, and a resumed or resharded run makes the same
images (bit for bit with the same per-device batch; another per-device batch runs other
kernels, whose float rounding can move a pixel by a level).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from unclip_jax import diffusion as D
from unclip_jax.clip import PretrainedClip, load_pretrained, preprocess_images
from unclip_jax.config import CHOICES, ConfigError
from unclip_jax.data.images import resize_shorter_side_and_center_crop, to_float
from unclip_jax.models.builders import (
    decoder_example_inputs,
    decoder_from_config,
    init_module,
    prior_example_inputs,
    prior_from_config,
    upsampler_example_inputs,
    upsampler_from_config,
)
from unclip_jax.models.clip import CLIP
from unclip_jax.models.prior import denormalize_embedding, unit_norm
from unclip_jax.models.prior_codec import codec_from_arrays
from unclip_jax.parallel import (
    LOGICAL_AXIS_RULES,
    batch_sharding,
    logical_shardings,
    make_mesh,
    replicate,
)
from unclip_jax.sampling.load import (
    StageWeights,
    check_params_fit,
    check_stage,
    read_stage,
    read_stage_config,
)
from unclip_jax.sampling.stages import (
    INVERSION_ITERS,
    ar_prior_sampler,
    decoder_conditioning,
    decoder_inverter,
    decoder_sampler,
    decoder_x0_predictor,
    inversion_sampling,
    prior_sampler,
    prior_text_conditioning,
    upsampler_sampler,
)
from unclip_jax.training.decoder_stage import check_clip_fits
from unclip_jax.training.prior_stage import CODEC_FILE, STATS_FILE, check_prior_fits_clip

Array = jax.Array
log = logging.getLogger("unclip_jax.sample")

PIPELINE_KEYS = ("clip", "prior", "decoder", "upsamplers", "settings")
_SAMPLING = ("steps", "method", "eta", "guidance_scale", "clip_x0", "dynamic_threshold")
# What `settings` (and `--set STAGE.KEY=VALUE`) may change, per stage; "upsampler" applies to
# every upsampler, "upsampler0", "upsampler1", ... to one (and win over "upsampler").
SETTINGS: dict[str, tuple[str, ...]] = {
    "prior": (*_SAMPLING, "uncond_text", "num_candidates", "temperature", "top_p"),
    "decoder": (*_SAMPLING, "uncond_text", "inversion_iters", "guidance_min_t"),
    "upsampler": ("steps", "method", "eta", "clip_x0", "dynamic_threshold"),
}
# The type each setting is read as (the rest are floats).
_SETTING_TYPES = {
    "steps": str,
    "method": str,
    "uncond_text": str,
    "num_candidates": int,
    "inversion_iters": int,
    "guidance_min_t": int,
}
# Settings with a fixed set of values (the config's choices).
_SETTING_CHOICES = {
    "method": CHOICES["sampling.method"],
    "uncond_text": CHOICES["sampling.uncond_text"],
}


def _settings_stage(stage: str) -> str:
    """'upsampler3' -> 'upsampler' (the table entry a stage name is checked against)."""
    return "upsampler" if stage.startswith("upsampler") and stage[9:].isdigit() else stage


# The fold of each stage's randomness into an image's key.
PRIOR_STREAM, DECODER_STREAM, UPSAMPLER_STREAM = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """The stages a cascade is built from (paths) and its sampling settings."""

    decoder: str
    priors: dict[str, str] = dataclasses.field(default_factory=dict)
    upsamplers: tuple[str, ...] = ()
    clip: str | None = None
    settings: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


def parse_settings(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """['decoder.guidance_scale=3', 'prior.steps=ddim25'] -> {'decoder': {...}, ...}; values
    are read as JSON where they parse (numbers) and kept as strings otherwise."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        stage, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"setting {pair!r}: expected STAGE.KEY=VALUE, e.g. decoder.steps=50")
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(stage, {})[name] = parsed
    return check_settings(out)


def check_settings(settings: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The settings with each value read as its type; a ConfigError names an unknown stage or
    setting, or a value of the wrong type."""
    if not isinstance(settings, Mapping):
        raise ConfigError(f"settings must be an object of stages, got {settings!r}")
    out: dict[str, dict[str, Any]] = {}
    for stage, values in settings.items():
        table = SETTINGS.get(_settings_stage(stage))
        if table is None or not isinstance(values, Mapping):
            raise ConfigError(
                f"unknown settings stage {stage!r} (or not an object); stages: "
                f"{', '.join(SETTINGS)}, upsampler0, upsampler1, ..."
            )
        out[stage] = {}
        for name, value in values.items():
            if name not in table:
                raise ConfigError(
                    f"unknown setting {stage}.{name}; {stage} settings: {', '.join(table)}"
                )
            kind = _SETTING_TYPES.get(name, float)
            try:
                out[stage][name] = kind(value)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"setting {stage}.{name} is {value!r}, not a {kind.__name__}"
                ) from None
            choices = _SETTING_CHOICES.get(name)
            if choices and out[stage][name] not in choices:
                raise ConfigError(
                    f"setting {stage}.{name} is {value!r}; valid values: {', '.join(choices)}"
                )
            if name == "guidance_min_t" and out[stage][name] < 0:
                raise ConfigError(
                    f"setting {stage}.{name} is {value!r}; it must be >= 0 (0: guide every step)"
                )
    return out


def read_pipeline(paths: Sequence[str]) -> PipelineSpec:
    """A pipeline from one JSON file, or from stage paths (training workdirs or stage
    directories) whose saved configs say which slot each fills: priors are named by their
    kind, upsamplers ordered by resolution. Missing paths, unknown keys, a stage in the wrong
    slot or a pipeline without a decoder are ConfigErrors naming them."""
    if not paths:
        raise ConfigError("--pipeline names nothing")
    if len(paths) == 1 and os.path.isfile(paths[0]):
        return _pipeline_file(paths[0])
    decoders, priors, upsamplers = [], {}, []
    for path in paths:
        if not os.path.exists(path):
            raise ConfigError(f"pipeline stage {path!r} does not exist")
        path = os.path.abspath(path)
        config = read_stage_config(path)
        stage = config.get("stage")
        if stage == "decoder":
            decoders.append(path)
        elif stage == "prior":
            name = "ar" if config.get("kind") == "autoregressive" else config.get("kind")
            name = name if name not in priors else f"{name}_{len(priors) + 1}"
            priors[name] = path
        elif stage == "upsampler":
            upsamplers.append((config["model"]["resolution"], path))
        else:
            raise ConfigError(
                f"{path!r} is a {stage!r} stage; a pipeline takes prior, "
                "decoder and upsampler stages"
            )
    if len(decoders) != 1:
        raise ConfigError(f"a pipeline needs exactly one decoder stage, got {decoders or 'none'}")
    return PipelineSpec(
        decoder=decoders[0],
        priors=priors,
        upsamplers=tuple(p for _, p in sorted(upsamplers)),
    )


def _pipeline_file(path: str) -> PipelineSpec:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"pipeline file {path}: not JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"pipeline file {path}: expected a JSON object")
    unknown = sorted(set(raw) - set(PIPELINE_KEYS))
    if unknown:
        raise ConfigError(
            f"pipeline file {path}: unknown key {unknown[0]!r}; keys: {', '.join(PIPELINE_KEYS)}"
        )
    if "decoder" not in raw:
        raise ConfigError(f"pipeline file {path}: no 'decoder'")
    here = os.path.dirname(os.path.abspath(path))

    def resolve(p: str) -> str:
        full = os.path.join(here, os.path.expanduser(p))
        if not os.path.exists(full):
            raise ConfigError(f"pipeline file {path}: {p!r} does not exist")
        return full

    priors = raw.get("prior") or {}
    priors = {"prior": priors} if isinstance(priors, str) else priors
    upsamplers = raw.get("upsamplers") or []
    upsamplers = [upsamplers] if isinstance(upsamplers, str) else upsamplers
    shapes_ok = (
        isinstance(raw["decoder"], str)
        and isinstance(priors, dict)
        and all(isinstance(v, str) for v in priors.values())
        and isinstance(upsamplers, list)
        and all(isinstance(v, str) for v in upsamplers)
        and isinstance(raw.get("clip") or "", str)
    )
    if not shapes_ok:
        raise ConfigError(
            f"pipeline file {path}: 'clip' and 'decoder' are paths, 'prior' a path or an object "
            "of name: path, 'upsamplers' a list of paths"
        )
    settings = check_settings(raw.get("settings") or {})
    return PipelineSpec(
        decoder=resolve(raw["decoder"]),
        priors={name: resolve(p) for name, p in priors.items()},
        upsamplers=tuple(resolve(p) for p in upsamplers),
        clip=resolve(raw["clip"]) if raw.get("clip") else None,
        settings=settings,
    )


def image_keys(seed: int, ids: Array) -> Array:
    """Per-image keys: row r of `ids` (B, 2) = (prompt index, sample index) -> its key."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i[0]), i[1]))(ids)


def _place(params: Any, shardings: Any) -> Any:
    """Host params as global arrays laid out by `shardings` (every process passes the same)."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
        params,
        shardings,
    )


class Cascade:
    """The loaded stages of a pipeline, their samplers, and the steps between them.

    Every method takes and returns batch-first arrays; on several devices, pass arrays whose
    batch is split over the mesh's data axes (`shard`), e.g. global arrays built with
    `parallel.global_batch` from each process's rows.
    """

    def __init__(
        self,
        spec: PipelineSpec,
        *,
        prior: str | None = None,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
        mesh: jax.sharding.Mesh | None = None,
        ema: bool = True,
        dtype: Any = jnp.float32,
    ) -> None:
        self.mesh = mesh if mesh is not None else make_mesh({"data": -1})
        self.dtype = dtype
        overrides = {k: dict(v) for k, v in (spec.settings or {}).items()}
        for stage, values in (settings or {}).items():
            overrides.setdefault(stage, {}).update(values)
        overrides = check_settings(overrides)
        self.decoder_weights = read_stage(spec.decoder, ema=ema)
        check_stage(self.decoder_weights, "decoder", "decoder")
        self.prior_name, self.prior_weights = None, None
        if spec.priors:
            self.prior_name = prior or next(iter(spec.priors))
            if self.prior_name not in spec.priors:
                raise ConfigError(
                    f"no prior named {self.prior_name!r} in the pipeline; priors: "
                    f"{', '.join(spec.priors)}"
                )
            self.prior_weights = read_stage(spec.priors[self.prior_name], ema=ema)
            check_stage(self.prior_weights, "prior", f"prior {self.prior_name!r}")
        elif prior:
            raise ConfigError(f"--prior {prior!r}: the pipeline names no prior")
        self.upsampler_weights = [read_stage(p, ema=ema) for p in spec.upsamplers]
        for i, w in enumerate(self.upsampler_weights):
            check_stage(w, "upsampler", f"upsampler {i}")
        self.clip = self._load_clip(spec.clip)
        self.settings = self._settings(overrides)
        clip_model = CLIP(self.clip.config, dtype=self.dtype)
        self._prior_encode = jax.jit(prior_text_conditioning(clip_model))
        self._encode_image = jax.jit(
            lambda p, x: clip_model.apply({"params": p}, x, method="encode_image")
        )
        self._build_decoder()
        self._build_prior()
        self._build_upsamplers()
        self.clip_params = replicate(jax.device_get(self.clip.params), self.mesh)
        self._empty: dict[str, dict[str, Array]] = {}  # `_empty_caption`, by stage

    # ---- loading ------------------------------------------------------------------------

    def _load_clip(self, path: str | None) -> PretrainedClip:
        candidates = [path] if path else []
        for weights in (self.prior_weights, self.decoder_weights):
            if weights is not None and weights.config.clip.dir:
                candidates.append(weights.config.clip.dir)
        found = next((p for p in candidates if os.path.isdir(p)), None)
        if found is None:
            raise ConfigError(
                "the pipeline's CLIP was not found: set 'clip' in the pipeline file (the stages "
                f"were trained with {candidates or 'no clip.dir'})"
            )
        clip = load_pretrained(found)
        check_clip_fits(
            self.decoder_weights.config.model, clip.config, clip.tokenizer.vocab_size, found
        )
        if self.prior_weights is not None:
            check_prior_fits_clip(self.prior_weights.config.model, clip.config, found)
        self.clip_dir = found
        return clip

    def _settings(self, overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
        def base(weights: StageWeights) -> dict[str, Any]:
            return dict(weights.config.sampling.to_dict())

        out = {"decoder": {**base(self.decoder_weights), **overrides.get("decoder", {})}}
        if self.prior_weights is not None:
            c = self.prior_weights.config
            out["prior"] = {
                **base(self.prior_weights),
                "num_candidates": c.guidance.num_candidates,
                "temperature": c.ar.temperature,
                "top_p": c.ar.top_p,
                **overrides.get("prior", {}),
            }
        for i, w in enumerate(self.upsampler_weights):
            out[f"upsampler{i}"] = {
                **base(w),
                **overrides.get("upsampler", {}),
                **overrides.get(f"upsampler{i}", {}),
            }
        unused = sorted(set(overrides) - set(out) - {"upsampler"})
        if unused:
            raise ConfigError(f"settings for {', '.join(unused)}: the pipeline has no such stage")
        return out

    def _place_stage(self, weights: StageWeights, module: Any, inputs: Mapping[str, Any]) -> Any:
        abstract = jax.eval_shape(functools.partial(init_module, module, inputs), jax.random.key(0))
        check_params_fit(weights, nn.meta.unbox(abstract))
        return _place(weights.params, logical_shardings(abstract, self.mesh))

    def _build_decoder(self) -> None:
        c = self.decoder_weights.config
        model = c.model.to_dict()
        self.decoder_model = model
        self.decoder = decoder_from_config(
            model, dtype=self.dtype, eos_token_id=self.clip.tokenizer.eos_id
        )
        self.decoder_params = self._place_stage(
            self.decoder_weights, self.decoder, decoder_example_inputs(model)
        )
        self.resolution = self.decoder_resolution = model["resolution"]
        self._decoder_encode = jax.jit(
            decoder_conditioning(
                CLIP(self.clip.config, dtype=self.dtype),
                text_encoder=model["text_encoder"],
                unit_z_i=model.get("unit_z_i", True),
                z_i_norm=model.get("z_i_norm", 1.0),
            )
        )
        self._decoders: dict[str, Any] = {}  # samplers by their settings (`decode`)
        self._x0_predictor: Any = None  # `predict_x0`, built on first use
        self._invert: Any = None  # `invert`, built on first use

    def _inverter(self) -> Any:
        if self._invert is None:  # raises for a decoder that cannot be inverted
            c = self.decoder_weights.config
            settings = self.settings["decoder"]
            self._invert = decoder_inverter(
                self.decoder,
                c.diffusion,
                inversion_sampling(settings, c.diffusion.num_steps),
                fixed_point_iters=int(settings.get("inversion_iters", INVERSION_ITERS)),
            )
        return self._invert

    def _build_prior(self) -> None:
        self.prior_kind = None
        if self.prior_weights is None:
            return
        c = self.prior_weights.config
        s = self.settings["prior"]
        self.prior_kind = c.kind
        self.prior = prior_from_config(
            c, vocab_size=self.clip.config.text.vocab_size, dtype=self.dtype
        )
        inputs = prior_example_inputs(c, text_width=self.clip.config.text.hidden_size)
        self.prior_params = self._place_stage(self.prior_weights, self.prior, inputs)
        if c.kind != "diffusion" and s.get("uncond_text", "drop") == "empty":
            raise ConfigError(
                "setting prior.uncond_text 'empty' is for the diffusion prior; the "
                "autoregressive prior's guidance drops the caption"
            )
        if c.kind == "diffusion":
            stats = None
            if c.embedding.normalization == "standardize":
                stats = load_file(self._prior_file(STATS_FILE))
            decode = functools.partial(
                denormalize_embedding,
                method=c.embedding.normalization,
                scale=c.embedding.embed_scale,
                stats=stats,
            )
            self._prior_sample = prior_sampler(
                self.prior, c.diffusion, s, decode=decode, num_candidates=s["num_candidates"]
            )
            self.prior_unit_norm = c.embedding.normalization != "standardize"
        else:
            codec = codec_from_arrays(
                load_file(self._prior_file(CODEC_FILE)),
                embed_dim=c.model.clip_dim,
                components=c.ar.pca_components,
                num_buckets=c.ar.num_buckets,
            )
            self.codec = replicate(jax.tree.map(np.asarray, codec), self.mesh)
            self._ar_sample = ar_prior_sampler(
                self.prior,
                temperature=float(s["temperature"]),
                top_p=float(s["top_p"]),
                guidance_scale=float(s["guidance_scale"]),
                dot_percentile=c.ar.dot_product_percentile,
            )
            self.prior_unit_norm = True
        if self.prior_unit_norm and not self.decoder_model.get("unit_z_i", True):
            log.warning(
                "the prior samples unit-norm z_i but the decoder was trained on raw CLIP "
                "embeddings (model.unit_z_i False): its conditioning will be off in scale"
            )

    def _prior_file(self, name: str) -> str:
        path = self.prior_weights.file(name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"the prior at {self.prior_weights.path} has no {name} (fitted when it was "
                "trained): copy it from the training workdir"
            )
        return path

    def _build_upsamplers(self) -> None:
        self.upsamplers, self.upsampler_params, self._upsample = [], [], []
        low = self.decoder_resolution
        for i, weights in enumerate(self.upsampler_weights):
            c = weights.config
            model = c.model.to_dict()
            if model["low_resolution"] != low:
                raise ConfigError(
                    f"upsampler {i} ({weights.path}) takes {model['low_resolution']} px images, "
                    f"but the stage before it makes {low} px"
                )
            learned = c.diffusion.variance == "learned_range"
            unet = upsampler_from_config(model, learned_variance=learned, dtype=self.dtype)
            self.upsamplers.append(unet)
            self.upsampler_params.append(
                self._place_stage(weights, unet, upsampler_example_inputs(model))
            )
            scale = model["resolution"] // model["low_resolution"]
            self._upsample.append(
                upsampler_sampler(unet, c.diffusion, self.settings[f"upsampler{i}"], scale=scale)
            )
            low = model["resolution"]
        self.resolution = low

    # ---- running ------------------------------------------------------------------------

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and the logical axis rules the models' sharding constraints read."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            yield

    @property
    def batch_multiple(self) -> int:
        """Global batches must be a multiple of this (the mesh's data x fsdp shards)."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def put(self, tree: Any) -> Any:
        """Host arrays (the whole batch, one process) on the mesh: split over its batch axes
        when they divide the batch, else whole on every device."""

        def one(x: Any) -> Array:
            x = np.asarray(x)
            if x.shape and x.shape[0] % self.batch_multiple == 0:
                return jax.device_put(x, batch_sharding(self.mesh))
            return replicate(x, self.mesh)

        return jax.tree.map(one, tree)

    def tokenize(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """The captions tokenized for the prior (at CLIP's context length) and for the decoder
        (at its text_tokens): {prior_ids, prior_mask, decoder_ids, decoder_mask}."""
        tok = self.clip.tokenizer
        ids, mask = tok(list(prompts), context_length=self.clip.config.context_length)
        d_ids, d_mask = tok(list(prompts), context_length=self.decoder_model["text_tokens"])
        return {
            "prior_ids": ids,
            "prior_mask": mask.astype(bool),
            "decoder_ids": d_ids,
            "decoder_mask": d_mask.astype(bool),
        }

    def text_embeddings(self, tokens: Mapping[str, Array]) -> Array:
        """CLIP's text embeddings z_t (B, D), not normalised."""
        with self.context():
            cond = self._prior_encode(self.clip_params, tokens["prior_ids"], tokens["prior_mask"])
        return cond["z_t"]

    def sample_z_i(self, tokens: Mapping[str, Array], keys: Array) -> Array:
        """The prior's z_i (B, D) for tokenized captions, one per key (image keys)."""
        if self.prior_weights is None:
            raise ConfigError("the pipeline names no prior: it cannot sample from captions")
        keys = D.fold_in(keys, PRIOR_STREAM)
        with self.context():
            cond = self._prior_encode(self.clip_params, tokens["prior_ids"], tokens["prior_mask"])
            if self.prior_kind == "diffusion":
                if self.settings["prior"].get("uncond_text", "drop") == "empty":
                    cond = {**cond, "uncond": self._empty_caption("prior")}
                return self._prior_sample(self.prior_params, cond, keys)
            inputs = {
                "input_ids": tokens["prior_ids"],
                "text_mask": tokens["prior_mask"],
                "z_t": unit_norm(cond["z_t"]),
            }
            return self._ar_sample(self.prior_params, self.codec, inputs, keys)

    def decoder_cond(
        self,
        z_i: Array,
        tokens: Mapping[str, Array],
        drop_text: Array | None = None,
        drop_image: Array | None = None,
    ) -> dict[str, Array]:
        """The decoder's conditioning: z_i (in CLIP's space) and the caption; `drop_text` /
        `drop_image` (bool, one per row) condition those rows on z_i alone / the caption
        alone, as guidance training dropped them."""
        batch = {
            "z_i": z_i,
            "input_ids": tokens["decoder_ids"],
            "text_mask": tokens["decoder_mask"],
        }
        with self.context():
            cond = self._decoder_encode(self.clip_params, batch)
        if drop_text is not None:
            cond["drop_text"] = drop_text
        if drop_image is not None:
            cond["drop_image"] = drop_image
        return cond

    def decode(
        self,
        cond: Mapping[str, Array],
        keys: Array,
        *,
        x_T: Array | None = None,
        exact: bool = False,
        **sampling: Any,
    ) -> Array:
        """Decoder images in [-1, 1] for `decoder_cond(...)`, one per key. With `x_T` the
        sampler starts from it; `exact` decodes with DDIM eta 0 and no clipping (the inverse
        of `invert`); other keyword args change the decoder's settings for this call (e.g.
        method="ddim", eta=1.0), each combination compiled once."""
        keys = D.fold_in(keys, DECODER_STREAM)
        settings = {**self.settings["decoder"], **sampling}
        if exact:
            settings = inversion_sampling(settings, self.decoder_weights.config.diffusion.num_steps)
        name = json.dumps(settings, sort_keys=True)
        if name not in self._decoders:
            check_settings({"decoder": sampling})
            self._decoders[name] = decoder_sampler(
                self.decoder,
                self.decoder_weights.config.diffusion,
                settings,
                resolution=self.decoder_resolution,
            )
        cond = self._with_uncond(cond, settings)
        with self.context():
            return self._decoders[name](self.decoder_params, cond, keys, x_T)

    def predict_x0(self, cond: Mapping[str, Array], x0: Array, t: Array, keys: Array) -> Array:
        """The decoder's one-step x0 estimate (guided as its sampler is) from decoder-resolution
        images x0 in [-1, 1] noised to training timesteps t (B,), one noise key per row."""
        if self._x0_predictor is None:
            self._x0_predictor = decoder_x0_predictor(
                self.decoder, self.decoder_weights.config.diffusion, self.settings["decoder"]
            )
        cond = self._with_uncond(cond, self.settings["decoder"])
        with self.context():
            return self._x0_predictor(self.decoder_params, cond, x0, t, keys)

    def invert(self, cond: Mapping[str, Array], x0: Array) -> Array:
        """DDIM inversion x0 -> x_T of decoder-resolution images in [-1, 1] on `cond`."""
        cond = self._with_uncond(cond, self.settings["decoder"])
        with self.context():
            return self._inverter()(self.decoder_params, cond, x0)

    def _with_uncond(self, cond: Mapping[str, Array], settings: Mapping[str, Any]) -> Any:
        """`cond` with the empty caption's encoding as `uncond` when the decoder's guidance
        contrasts with it (`uncond_text` "empty", Karlo's)."""
        if settings.get("uncond_text", "drop") != "empty" or "uncond" in cond:
            return cond
        return {**cond, "uncond": self._empty_caption("decoder")}

    def _empty_caption(self, stage: str) -> dict[str, Array]:
        """The empty caption "" encoded for `stage` ('prior': z_t, text_states, text_mask at
        CLIP's context length; 'decoder': the decoder's caption keys at its text_tokens), one
        row, computed once: the unconditional half of Karlo's guidance."""
        if stage not in self._empty:
            tokens = self.tokenize([""])
            with self.context():
                if stage == "prior":
                    ids = replicate(tokens["prior_ids"], self.mesh)
                    mask = replicate(tokens["prior_mask"], self.mesh)
                    self._empty[stage] = dict(self._prior_encode(self.clip_params, ids, mask))
                else:
                    batch = {
                        "z_i": np.zeros((1, self.decoder_model["clip_dim"]), np.float32),
                        "input_ids": tokens["decoder_ids"],
                        "text_mask": tokens["decoder_mask"],
                    }
                    cond = self._decoder_encode(self.clip_params, replicate(batch, self.mesh))
                    self._empty[stage] = {k: v for k, v in cond.items() if k != "z_i"}
        return self._empty[stage]

    def upsample(self, images: Array, keys: Array) -> Array:
        """Decoder images through every upsampler, in order; each stage's input is clipped to
        [-1, 1], the range the upsamplers trained on (Karlo's pipeline clamps too)."""
        with self.context():
            for i, (fn, params) in enumerate(
                zip(self._upsample, self.upsampler_params, strict=True)
            ):
                images = fn(
                    params, jnp.clip(images, -1.0, 1.0), D.fold_in(keys, UPSAMPLER_STREAM + i)
                )
        return images

    def generate(self, tokens: Mapping[str, Array], keys: Array) -> Array:
        """The whole cascade: tokenized captions -> final images in [-1, 1], one per key."""
        z_i = self.sample_z_i(tokens, keys)
        images = self.decode(self.decoder_cond(z_i, tokens), keys)
        return self.upsample(images, keys)

    # ---- images in ----------------------------------------------------------------------

    def image_inputs(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """uint8 HWC images of any size -> {"clip_pixels", "x0"}: CLIP's preprocessing, and
        the centre crop at the decoder's resolution in [-1, 1]."""
        clip = self.clip
        pixels = preprocess_images(
            images,
            clip.config.require_vision("an image as input").image_size,
            mean=clip.image_mean,
            std=clip.image_std,
        )
        x0 = np.stack(
            [
                to_float(resize_shorter_side_and_center_crop(im, self.decoder_resolution))
                for im in images
            ]
        )
        return {"clip_pixels": pixels, "x0": x0}

    def image_embeddings(self, clip_pixels: Array) -> Array:
        """CLIP's image embeddings z_i (B, D) of preprocessed pixels, not normalised."""
        with self.context():
            return self._encode_image(self.clip_params, clip_pixels)

    def describe(self) -> dict[str, Any]:
        """What the cascade was built from and its settings (for manifests and logs)."""
        return {
            "clip": self.clip_dir,
            "prior": None
            if self.prior_weights is None
            else {
                "name": self.prior_name,
                "path": self.prior_weights.path,
                "step": self.prior_weights.step,
            },
            "decoder": {"path": self.decoder_weights.path, "step": self.decoder_weights.step},
            "upsamplers": [{"path": w.path, "step": w.step} for w in self.upsampler_weights],
            "settings": self.settings,
            "resolution": self.resolution,
        }
