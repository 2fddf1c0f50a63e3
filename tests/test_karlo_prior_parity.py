"""Parity of our diffusion prior with diffusers' `PriorTransformer` (Karlo's), through the
converter of `unclip_jax.convert.diffusers_prior`.

Tiny size (2 heads x 12 = width 24, 2 layers, 16-d embeddings and caption states, a 5-token
caption with padding): the width differs from the embedding size, as in Karlo (2048 vs 768),
so that every Linear is non-square and a transposed kernel cannot pass by its shape. Every
weight is random (the zero-initialised positional_embedding, prd_embedding and clip_mean /
clip_std perturbed) so that every tensor takes part. Needs the `peers` extra.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the peers extra: pip install -e '.[peers]'")
diffusers = pytest.importorskip(
    "diffusers", reason="needs the peers extra: pip install -e '.[peers]'"
)

import jax.numpy as jnp  # noqa: E402

# The decoder parity test's helpers: random weights, state dicts, abstract trees and the
# scale-relative comparison (its tolerance, 1e-4 of max |reference output|, applies here too).
from test_karlo_parity import (  # noqa: E402
    RTOL_OF_SCALE,
    _abstract,
    _assert_close,
    _randomise,
    _state_dict,
)

from unclip_jax.convert.diffusers_prior import (  # noqa: E402
    STATS_KEYS,
    CheckpointKeyError,
    params_to_prior,
    prior_key_to_path,
    prior_path_to_key,
    prior_to_params,
)
from unclip_jax.convert.hf_clip import flatten_paths  # noqa: E402
from unclip_jax.diffusion import make_schedule, q_sample  # noqa: E402
from unclip_jax.models.prior import DiffusionPrior, normalize_embedding  # noqa: E402

pytestmark = pytest.mark.peers

BATCH, HEADS, HEAD_DIM, LAYERS, CLIP_DIM, N_TOKENS = 2, 2, 12, 2, 16, 5
WIDTH = HEADS * HEAD_DIM
# Valid caption tokens; element 0 has one padded token, element 1 two.
TEXT_MASK = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)
assert RTOL_OF_SCALE == 1e-4


def peer_prior():
    """diffusers' Karlo prior layout (the `prior` of UnCLIPPipeline) at a tiny size."""
    torch.manual_seed(0)
    peer = diffusers.PriorTransformer(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=LAYERS,
        embedding_dim=CLIP_DIM,
        num_embeddings=N_TOKENS,
        additional_embeddings=4,
    )
    peer = _randomise(peer, seed=30)
    with torch.no_grad():  # a std must be positive to be one
        peer.clip_std.copy_(peer.clip_std.abs() + 0.5)
    return peer


def our_prior():
    return DiffusionPrior(
        clip_dim=CLIP_DIM, width=WIDTH, layers=LAYERS, heads=HEADS, text_tokens=N_TOKENS
    )


def _prior_abstract(ours):
    return _abstract(
        ours,
        jnp.zeros((BATCH, CLIP_DIM)),
        jnp.zeros((BATCH,)),
        jnp.zeros((BATCH, CLIP_DIM)),
        jnp.zeros((BATCH, N_TOKENS, CLIP_DIM)),
        jnp.ones((BATCH, N_TOKENS), bool),
    )


@pytest.fixture(scope="module")
def prior_pair():
    peer = peer_prior()
    ours = our_prior()
    params, stats = prior_to_params(_state_dict(peer), _prior_abstract(ours), source="tiny prior")
    return peer, ours, params, stats


def _inputs(stats):
    """A training example as Karlo's prior sees it: z_i standardised with the checkpoint's
    clip_mean/clip_std, then noised at t; z_t and the caption states as the CLIP text tower
    would give them (random here)."""
    rng = np.random.default_rng(42)
    z_i = rng.standard_normal((BATCH, CLIP_DIM)).astype(np.float32)
    t = np.array([3, 717], np.int32)
    x0 = normalize_embedding(z_i, method="standardize", stats=stats)
    x_t = q_sample(
        x0=x0,
        t=jnp.asarray(t),
        noise=jnp.asarray(rng.standard_normal((BATCH, CLIP_DIM)), jnp.float32),
        sched=make_schedule("cosine", 1000),
    )
    return dict(
        x_t=np.array(x_t, np.float32),  # writable, for torch.from_numpy
        t=t,
        z_t=rng.standard_normal((BATCH, CLIP_DIM)).astype(np.float32),
        text_states=rng.standard_normal((BATCH, N_TOKENS, CLIP_DIM)).astype(np.float32),
        text_mask=TEXT_MASK,
    )


def _peer_out(peer, inp):
    with torch.no_grad():
        return peer(
            hidden_states=torch.from_numpy(inp["x_t"]),
            timestep=torch.from_numpy(inp["t"].astype(np.int64)),
            proj_embedding=torch.from_numpy(inp["z_t"]),
            encoder_hidden_states=torch.from_numpy(inp["text_states"]),
            attention_mask=torch.from_numpy(inp["text_mask"]),
        ).predicted_image_embedding.numpy()


def _our_out(ours, params, inp):
    return np.asarray(
        ours.apply(
            {"params": params},
            jnp.asarray(inp["x_t"]),
            jnp.asarray(inp["t"], jnp.float32),
            jnp.asarray(inp["z_t"]),
            jnp.asarray(inp["text_states"]),
            jnp.asarray(inp["text_mask"]),
        )
    )


def test_prior_equals_diffusers_prior_transformer(prior_pair):
    peer, ours, params, stats = prior_pair
    inp = _inputs(stats)
    err, scale = _assert_close(_our_out(ours, params, inp), _peer_out(peer, inp), "prior output")
    print(f"prior: max |diff| {err:.3g} at output scale {scale:.3g}")


def test_the_embedding_stats_come_back_apart(prior_pair):
    """clip_mean / clip_std are not params: they come back in fit_embedding_stats' format, and
    our denormalisation with them is diffusers' post_process_latents."""
    peer, _, params, stats = prior_pair
    assert "clip_mean" not in params and "clip_std" not in params
    assert sorted(stats) == ["clip_mean", "clip_std"]
    for key in stats:
        assert stats[key].shape == (CLIP_DIM,) and stats[key].dtype == np.float32
        np.testing.assert_array_equal(stats[key], getattr(peer, key).detach().numpy()[0])
    x = np.random.default_rng(0).standard_normal((BATCH, CLIP_DIM)).astype(np.float32)
    with torch.no_grad():
        ref = peer.post_process_latents(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(x * stats["clip_std"] + stats["clip_mean"], ref, rtol=1e-6)


def test_padded_caption_tokens_change_nothing_on_both_sides(prior_pair):
    """The padded caption token is masked on both sides (diffusers' -10000, our float32
    minimum); a valid one changes both outputs, equally."""
    peer, ours, params, stats = prior_pair
    inp = _inputs(stats)
    base_ours, base_peer = _our_out(ours, params, inp), _peer_out(peer, inp)
    padded = dict(inp, text_states=inp["text_states"].copy())
    padded["text_states"][0, -1] += 5.0
    np.testing.assert_allclose(_our_out(ours, params, padded), base_ours, atol=1e-6)
    np.testing.assert_allclose(_peer_out(peer, padded), base_peer, atol=1e-6)
    valid = dict(inp, text_states=inp["text_states"].copy())
    valid["text_states"][0, 0] += 5.0
    changed = _our_out(ours, params, valid)
    assert np.abs(changed[0] - base_ours[0]).max() > 1e-3
    _assert_close(changed, _peer_out(peer, valid), "prior output, caption changed")


def test_params_round_trip_to_the_diffusers_state_dict(prior_pair):
    peer, _, params, stats = prior_pair
    tensors = params_to_prior(params, stats)
    reference = _state_dict(peer)
    assert sorted(tensors) == sorted(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)
    peer.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)


def test_without_stats_the_round_trip_writes_identity_statistics(prior_pair):
    _, _, params, _ = prior_pair
    tensors = params_to_prior(params)
    np.testing.assert_array_equal(tensors["clip_mean"], np.zeros((1, CLIP_DIM), np.float32))
    np.testing.assert_array_equal(tensors["clip_std"], np.ones((1, CLIP_DIM), np.float32))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda sd: sd.pop("transformer_blocks.1.ff.net.0.proj.weight"),
            r"tiny prior: tensor 'transformer_blocks\.1\.ff\.net\.0\.proj\.weight' is missing "
            r"\(1 in all\)",
        ),
        (
            lambda sd: sd.pop("transformer_blocks.0.norm3.weight"),
            r"'transformer_blocks\.0\.norm3\.weight' is missing",
        ),
        (lambda sd: sd.pop("prd_embedding"), r"'prd_embedding' is missing"),
        (lambda sd: sd.pop("clip_std"), r"'clip_std' is missing"),
        (
            lambda sd: sd.update({"norm_in.weight": np.ones(WIDTH, np.float32)}),
            r"tensor 'norm_in\.weight' is not used by this prior",
        ),
        (
            lambda sd: sd.update({"transformer_blocks.0.attn2.to_q.weight": np.ones((4, 4))}),
            r"tensor 'transformer_blocks\.0\.attn2\.to_q\.weight' is not used by this prior",
        ),
        (
            lambda sd: sd.update({"clip_mean.scale": np.ones(3)}),
            r"unexpected tensor 'clip_mean\.scale'",
        ),
        (
            lambda sd: sd.update(
                {"positional_embedding": np.zeros((1, N_TOKENS + 3, WIDTH), np.float32)}
            ),
            r"'positional_embedding' has shape \(1, 8, 24\), the prior needs \(1, 9, 24\)",
        ),
        (
            lambda sd: sd.update({"proj_in.weight": np.zeros((WIDTH, 8), np.float32)}),
            r"'proj_in\.weight' has shape \(24, 8\), the prior needs \(24, 16\)",
        ),
        (
            lambda sd: sd.update({"clip_std": np.zeros((1, CLIP_DIM), np.float32)}),
            r"'clip_std' has 16 entries <= 0",
        ),
    ],
)
def test_a_missing_unused_or_misshaped_tensor_is_named(prior_pair, mutate, message):
    peer, ours, _, _ = prior_pair
    sd = _state_dict(peer)
    mutate(sd)
    with pytest.raises(CheckpointKeyError, match=message):
        prior_to_params(sd, _prior_abstract(ours), source="tiny prior")


def test_karlos_full_size_prior_maps_every_tensor():
    """Karlo's prior config (diffusers' PriorTransformer defaults: 32 heads x 64, 20 layers,
    768-d embeddings, 77 tokens) against DiffusionPrior(clip_dim=768, width=2048, layers=20,
    heads=32, text_tokens=77): every tensor maps onto a param of the right shape and back, and
    every param is covered. Shapes only (a meta-device model and jax.eval_shape): no 4 GB."""
    with torch.device("meta"):
        peer = diffusers.PriorTransformer()
    ours = DiffusionPrior(clip_dim=768, width=2048, layers=20, heads=32, text_tokens=77)
    abstract = _abstract(
        ours,
        jnp.zeros((1, 768)),
        jnp.zeros((1,)),
        jnp.zeros((1, 768)),
        jnp.zeros((1, 77, 768)),
        jnp.ones((1, 77), bool),
    )
    wanted = flatten_paths(abstract)
    covered = set()
    for key, tensor in peer.state_dict().items():
        shape = tuple(tensor.shape)
        if key in STATS_KEYS:
            assert shape == (1, 768), key
            continue
        path, transform = prior_key_to_path(key, len(shape))
        assert path in wanted, key
        ours_shape = tuple(wanted[path].shape)
        assert (shape[::-1] if transform == "kernel" else shape) == ours_shape, key
        assert prior_path_to_key(path, len(ours_shape)) == (key, transform)
        covered.add(path)
    assert covered == set(wanted)
    assert sum(int(np.prod(v.shape)) for v in wanted.values()) == 1_022_028_544
