"""`train.remat`: every stage's trained model recomputes activations in the backward pass
without changing its params, its loss or its gradients."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.config import load_config
from unclip_jax.models.clip import ClipConfig
from unclip_jax.training.stages import build_step_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_like(spec, key, vocab):
    """Random values for a tree of ShapeDtypeStructs (token ids below `vocab`, masks on)."""
    leaves, treedef = jax.tree.flatten(spec)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, leaf in zip(keys, leaves, strict=True):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            out.append(0.5 * jax.random.normal(k, leaf.shape, leaf.dtype))
        elif leaf.dtype == jnp.bool_:
            out.append(jnp.ones(leaf.shape, bool))
        else:
            out.append(jax.random.randint(k, leaf.shape, 0, vocab).astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)


def _loss_and_grads(config, clip_config, vocab):
    spec = build_step_spec(config, clip_config)
    params = nn.meta.unbox(spec.init_params(jax.random.key(0)))
    # Away from the zero-initialised output layers, so that every param gets a gradient.
    params = jax.tree.map(
        lambda p, n: p + 0.05 * n, params, _random_like(params, jax.random.key(1), vocab)
    )
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct((2, *a.shape), a.dtype), spec.batch_row)
    batch = _random_like(batch, jax.random.key(2), vocab)
    frozen = _random_like(spec.frozen, jax.random.key(3), vocab)
    if frozen is not None and frozen.get("stats") is not None:
        frozen["stats"]["clip_std"] = jnp.abs(frozen["stats"]["clip_std"]) + 0.5

    def loss(p):
        return spec.loss_fn(p, batch, jax.random.key(4), frozen)[0]

    return params, jax.jit(jax.value_and_grad(loss))(params)


STAGES = [
    ("decoder", {"guidance.text_drop_prob": 0.0, "model.dropout": 0.1}),
    ("upsampler", {"model.dropout": 0.1}),
    ("prior", {"model.dropout": 0.1}),
    ("clip", {}),
]


@pytest.mark.parametrize("stage,overrides", STAGES, ids=[s for s, _ in STAGES])
def test_remat_changes_neither_params_nor_loss_nor_gradients(stage, overrides):
    clip_model = load_config(f"{ROOT}/configs/clip.py:tiny").model.to_dict()
    clip_config = ClipConfig.from_model_config(clip_model)
    vocab = clip_model["vocab_size"]
    results = []
    for remat in (False, True):
        config = load_config(f"{ROOT}/configs/{stage}.py:tiny", {**overrides, "train.remat": remat})
        results.append(_loss_and_grads(config, clip_config, vocab))
    (params, (loss, grads)), (params_r, (loss_r, grads_r)) = results
    assert jax.tree.structure(params) == jax.tree.structure(params_r)
    assert float(loss) > 0
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-6)
    # The gradients are not trivially zero (the check would then say nothing).
    assert sum(float(jnp.sum(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads)) > 0.9 * len(
        jax.tree.leaves(grads)
    )
