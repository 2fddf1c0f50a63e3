"""The prior P(z_i | y): a diffusion prior (default) or the autoregressive prior.

Variants: tiny (tests), shapes (CPU demo), paper (the 1B diffusion prior of Table 3),
paper_ar (the 1B autoregressive prior of Table 3), karlo (Karlo's diffusion prior, diffusers
layout, for weight import).
"""

import ml_collections

from unclip_jax.config import (
    diffusion_block,
    mesh_block,
    optim_block,
    sampling_block,
    train_block,
    unknown_variant,
)

VARIANTS = ("tiny", "shapes", "paper", "paper_ar", "karlo")


def get_config(arg: str = "shapes") -> ml_collections.ConfigDict:
    """The prior config for variant `arg`."""
    if arg not in VARIANTS:
        raise unknown_variant(arg, VARIANTS, stage="prior")
    c = ml_collections.ConfigDict()
    c.stage = "prior"
    c.variant = arg
    c.kind = "diffusion"  # or "autoregressive"
    c.model = dict(
        clip_dim=128,  # width of z_t and z_i: the CLIP embedding dimension
        width=128,
        layers=4,
        heads=4,
        text_tokens=16,  # caption token states in the prefix: the CLIP's context length
        dropout=0.0,
    )
    # The frozen CLIP whose text tower gives z_t and the caption's token states (its tokenizer
    # reads the shards' captions): a Hugging Face CLIP directory or WORKDIR/clip of our own.
    c.clip = dict(dir="")
    # How z_i is scaled before diffusion [open in the paper]: "constant" multiplies by
    # embed_scale (paper: 17.2), "sqrt_dim" by sqrt(clip_dim), "standardize" uses a
    # per-dimension mean/std computed on the training embeddings (Karlo's clip_mean/clip_std).
    c.embedding = dict(normalization="sqrt_dim", embed_scale=17.2)
    c.guidance = dict(cond_drop_prob=0.1, num_candidates=2)
    # The prior predicts the clean z_i directly (x0) with an MSE loss (paper, Section 2.2).
    c.diffusion = diffusion_block(schedule="cosine", prediction="x0", variance="fixed_small")
    c.sampling = sampling_block(steps="64", method="ddpm", guidance_scale=1.0, clip_x0=0.0)
    # The unconditional half of guidance (diffusion prior): "drop" masks the caption out and
    # zeroes z_t, as guidance training dropped them; "empty" feeds CLIP's encoding of the empty
    # caption "" instead (Karlo's pipeline, for its imported weights).
    c.sampling.uncond_text = "drop"
    # Embedding shards (`unclip-jax embed`, clip-retrieval or LAION npy + metadata): z_i and the
    # captions. The test shards feed the evaluation.
    c.data = dict(embeddings_dir="", test_embeddings_dir="", workers=0, cache=False)
    # Every `every` steps (and at the end) on `num_examples` test captions: cosine of the
    # sampled z_i with the true z_i, with z_t and with an unrelated caption's z_t, and top-1
    # retrieval of the true image among the test images (0: never).
    c.eval = dict(every=1_000, num_examples=512)
    # The CPU demo's prior (`shapes`): 0.8M params, 600 steps of 128 embeddings, ~0.2 s each on
    # 2 cores. Measured against the earlier 4.7M one (width 256, 6 layers, batch 256, lr 3e-4):
    # after 300 steps the sampled z_i's cosine with the true one is 0.96 (top-1 retrieval among
    # the 540 test images 0.52), where the larger one reached 0.82 (0.27) after 600 steps of
    # 1.9 s.
    c.train = train_block(steps=600, batch_size=128, checkpoint_every=200, log_every=50)
    c.mesh = mesh_block()
    c.optim = optim_block(
        lr=1e-3, warmup_steps=60, weight_decay=0.06, b2=0.96, eps=1e-6, ema_decay=0.999
    )
    # Knobs of the autoregressive prior (used when kind == "autoregressive").
    c.ar = dict(
        pca_components=64,
        num_buckets=256,
        bucketing="quantile",
        clip_quantile=0.999,
        dot_product_percentile=50.0,
        temperature=1.0,  # sampling: softmax temperature and nucleus (top-p) of each token
        top_p=1.0,
    )
    if arg == "tiny":
        c.model.update(clip_dim=16, width=32, layers=2, heads=2, text_tokens=16)
        c.sampling.steps = "8"
        c.eval.update(every=0, num_examples=16)
        c.train.update(steps=4, batch_size=8, checkpoint_every=2, log_every=1)
        c.ar.update(pca_components=8, num_buckets=16)
    elif arg == "paper":
        # Table 3, diffusion prior: 1B params, width 2048, 24 blocks; batch 4096, 600K steps,
        # lr 1.1e-4, AdamW wd 6.0e-2, beta2 0.96, eps 1e-6, EMA 0.9999; 64 strided steps.
        c.model.update(clip_dim=1024, width=2048, layers=24, heads=32, text_tokens=77)
        c.embedding.normalization = "constant"
        c.sampling.steps = "64"
        c.eval.every = 10_000
        c.mesh.update(data=1, fsdp=-1)  # 1B params + Adam: shard them (FSDP)
        c.train.update(steps=600_000, batch_size=4096, checkpoint_every=5_000, log_every=100)
        c.optim.update(
            lr=1.1e-4, warmup_steps=10_000, weight_decay=6.0e-2, b2=0.96, eps=1e-6, ema_decay=0.9999
        )
    elif arg == "paper_ar":
        # Table 3, AR prior: 1B params; PCA to 319 dims, 1024 buckets; width 1664, 24 layers,
        # 26 heads; batch 4096, 1M steps, lr 1.6e-4, wd 4.0e-2, beta2 0.91, eps 1e-10, EMA 0.999.
        c.kind = "autoregressive"
        c.model.update(clip_dim=1024, width=1664, layers=24, heads=26, text_tokens=77)
        c.ar.update(pca_components=319, num_buckets=1024)
        c.eval.every = 10_000
        c.mesh.update(data=1, fsdp=-1)  # 1B params + Adam: shard them (FSDP)
        c.train.update(steps=1_000_000, batch_size=4096, checkpoint_every=5_000, log_every=100)
        c.optim.update(
            lr=1.6e-4, warmup_steps=10_000, weight_decay=4.0e-2, b2=0.91, eps=1e-10, ema_decay=0.999
        )
    elif arg == "karlo":
        # kakaobrain/karlo-v1-alpha prior (diffusers PriorTransformer): 32 heads x 64 = 2048,
        # 20 layers, embedding 768, 77 text tokens (+4 extra), clip_mean/clip_std
        # standardisation; x0 prediction, fixed_small_log variance, x0 clipped to +-5
        # (diffusers; +-10 in the original code); 25 steps, guidance 4.0, one sample per
        # caption, UnCLIPScheduler's steps and the empty caption's encoding as unconditional.
        c.model.update(clip_dim=768, width=2048, layers=20, heads=32, text_tokens=77)
        c.embedding.normalization = "standardize"
        c.guidance.num_candidates = 1
        c.sampling.update(
            steps="25", method="karlo", guidance_scale=4.0, clip_x0=5.0, uncond_text="empty"
        )
        c.eval.every = 10_000
        c.mesh.update(data=1, fsdp=-1)  # 1B params + Adam: shard them (FSDP)
        c.train.update(steps=1_000_000, batch_size=4096, checkpoint_every=5_000, log_every=100)
        c.optim.update(lr=1.1e-4, warmup_steps=10_000)
    return c


def sweep():
    """Learning rate x conditioning-drop probability, on top of the chosen variant."""
    for lr in (1e-4, 3e-4):
        for drop in (0.1, 0.2):
            yield {"optim.lr": lr, "guidance.cond_drop_prob": drop}
