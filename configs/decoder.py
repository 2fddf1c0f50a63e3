"""The decoder P(x | z_i, y), 64x64 in the paper: GLIDE's ADM U-Net conditioned on the CLIP
image embedding z_i.

Variants: tiny (tests), shapes (CPU demo), paper (Table 3's 3.5B decoder), karlo (Karlo's
decoder in diffusers layout, for weight import).
"""

import ml_collections

from unclip_jax.config import (
    diffusion_block,
    image_data_block,
    mesh_block,
    optim_block,
    sampling_block,
    train_block,
    unknown_variant,
)

VARIANTS = ("tiny", "shapes", "paper", "karlo")


def get_config(arg: str = "shapes") -> ml_collections.ConfigDict:
    """The decoder config for variant `arg`."""
    if arg not in VARIANTS:
        raise unknown_variant(arg, VARIANTS, stage="decoder")
    c = ml_collections.ConfigDict()
    c.stage = "decoder"
    c.variant = arg
    # The base block is the CPU demo's (`shapes`): 32 px, the resolution of the shapes CLIP,
    # about 66 GFLOP per train step of 32 (XLA's cost analysis), so ~0.6 s on 2 cores.
    c.model = dict(
        resolution=32,
        channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(16, 8),
        head_channels=32,
        dropout=0.1,
        num_groups=32,
        coord_channels=False,  # (y, x) input channels, a position signal (not in the paper)
        patch_size=1,  # U-Net on patch_size^2 pixels stacked on channels (not in the paper)
        pixel_head=0,  # channels of a full-resolution head after a patched U-Net (0: none)
        # Self-conditioning (Chen et al. 2022, "Analog Bits"; not in the paper): the U-Net reads
        # its previous step's x0 estimate next to x_t (trained on its own no-gradient estimate
        # half the time, zeros otherwise); no DDIM inversion then. Off in every variant: the
        # `shapes` decoder drew no more small squares with it, for 1.3x the step
        # (benchmarks/README.md, "Self-conditioning, and attention at 16 px").
        self_condition=False,
        clip_dim=128,  # the conditioning CLIP's embedding width (checked against clip.dir)
        # z_i scaled to unit norm: the space the priors sample in (CLIP compares embeddings by
        # cosine). False feeds CLIP's raw image_embeds, as Karlo's decoder was trained.
        unit_z_i=True,
        # The norm unit z_i is scaled to before the decoder's projections (not in the paper):
        # 1 keeps the priors' space; sqrt(clip_dim) gives entries of order 1, as the
        # LayerNorm'd caption states have (see the `shapes` variant for why it matters).
        z_i_norm=1.0,
        num_context_tokens=4,  # z_i projected into this many extra attention tokens
        context_dim=128,  # width of the attention context (the 4 z_i tokens + caption states)
        # The caption encoder [open]: "transformer" (GLIDE's own, trained with the decoder, on
        # the CLIP tokenizer's ids) or "clip" (Karlo: the frozen CLIP text tower's hidden
        # states, normalised and projected; text_width/text_tokens must be the CLIP's).
        text_encoder="transformer",
        text_width=128,
        text_layers=2,
        text_heads=4,
        text_tokens=16,  # the shapes captions' longest is 15 (configs/clip.py)
        vocab_size=1024,
    )
    # The frozen CLIP that gives z_i (and, for text_encoder "clip", the caption states): a
    # Hugging Face CLIP directory, e.g. WORKDIR/clip of `unclip-jax train configs/clip.py:...`.
    c.clip = dict(dir="")
    # Guidance training (Section 2.1): z_i replaced by a learned embedding 10% of the time,
    # the caption dropped 50% of the time, independently.
    c.guidance = dict(clip_drop_prob=0.1, text_drop_prob=0.5)
    # Learned sigma with the hybrid loss L_simple + 0.001 L_vlb, cosine, 1000 steps.
    c.diffusion = diffusion_block(variance="learned_range", loss="hybrid", vlb_weight=0.001)
    c.sampling = sampling_block(steps="50", method="ddpm", guidance_scale=3.0)
    # The unconditional half of guidance: z_i is the learned null embedding, and the caption is
    # dropped ("drop", as guidance training dropped it) or the encoding of the empty caption ""
    # ("empty": Karlo's pipeline, for its imported weights, and the `shapes` variant's).
    c.sampling.uncond_text = "drop"
    # Guidance at timesteps t >= guidance_min_t only, the conditional prediction alone below
    # (a guidance interval; 0: guidance at every step, the paper's way).
    c.sampling.guidance_min_t = 0
    # The dataset renders (shapes) or holds images at data.resolution; they are resized to
    # model.resolution for the decoder and to the CLIP's own size for z_i.
    c.data = image_data_block(resolution=32)
    # The train split's CLIP embeddings (`unclip-jax embed` of this dataset with clip.dir's
    # CLIP; row i is example i, checked by caption): z_i read from them rather than computed
    # in each step by the frozen CLIP's image tower ("": computed). caption_states: with
    # them, each distinct caption of their metadata encoded by CLIP's text tower once at the
    # start (text_encoder "clip" only; for datasets of few distinct captions, like shapes.
    # 2,250, not LAION's). The demo sets both: its step then runs no CLIP.
    c.data.update(embeddings_dir="", caption_states=False)
    # Sample grids of the EMA model (guided, config.sampling) on the first `num` test captions,
    # every `every` steps and at the end, to WORKDIR/samples and TensorBoard (0: never).
    c.samples = dict(every=1_000, num=8)
    c.train = train_block(steps=4_000, batch_size=32, checkpoint_every=500, log_every=50)
    c.mesh = mesh_block()
    c.optim = optim_block(lr=5e-4, warmup_steps=200, ema_decay=0.999)
    if arg == "shapes":
        # Tuned for the CPU demo's minutes of training (the paper's recipe is below in
        # `paper`). v-prediction: with eps-prediction the loss puts almost no weight on x0 at
        # high noise, where the background colour is decided, and after 1,000 steps of 32 the
        # samples' backgrounds took the colour of x_T's channel means (off the palette: 40%
        # read right); with v, 98% after 500 steps. No dropout and a cosine-decayed lr (below)
        # for a run this short; attention at 8 px only, the cheaper choice (16 px as well
        # was not compared for quality). Coordinate channels: after 750 steps position was
        # read right for 22% of samples (chance: 20%), the U-Net having no sense of where it
        # is but the padding.
        c.diffusion.prediction = "v"
        c.model.update(dropout=0.0, attention_resolutions=(8,), coord_channels=True)
        # z_i at norm 4 sqrt(128), entries of order 4. At unit norm its projections start ~10x
        # smaller than the timestep's and the caption's, and in 3,000 steps the decoder never
        # learned to use it at high noise, where the object's place is decided (a one-hot of
        # the true position written into z_i: 15% placed right, chance 20%); at sqrt(128),
        # 68% after 800 steps (README, "The demo"). With a CLIP whose z_i carries position
        # (hard negatives, configs/clip.py), 800 steps placed 34% of objects right at 4 sqrt(128)
        # against 23% at sqrt(128) and 26% at 128 (96 seen-pair test prompts, each given its
        # true z_i: benchmarks/decoder_oracle.py).
        c.model.z_i_norm = 4 * 128**0.5
        # The U-Net on 2 x 2 pixel patches (levels at 16 and 8 px, 64 channels each) instead
        # of on pixels (32, 16, 8 px; 32, 64, 64): the 32 px level was half of each step's
        # cost. 0.23 s a step of 16 against 0.43 s, and in equal time (1,600 steps against
        # 800) it placed 47% of objects right against 34%, shape 34% against 27%, all five
        # 10.4% against 9.4% (benchmarks/decoder_oracle.py, 96 seen-pair prompts, true z_i).
        c.model.update(patch_size=2, channel_mult=(2, 2))
        # The caption as the frozen CLIP's text states (Karlo's way) rather than a transformer
        # trained with the decoder: as accurate in 1,600 steps (position 48% against 47%, all
        # five 11.5% against 10.4%, with a CLIP trained with hard negatives) and 0.18 s a step
        # against 0.22 s, the caption transformer's training no longer paid for.
        c.model.text_encoder = "clip"
        # Training t drawn as floor(1000 u^0.5) (density rising linearly in t) rather than
        # uniform: the object's shape and place are settled at t ~ 950-750, where uniform t
        # spends a fifth of the steps. In 1,600 steps, given each test image's true z_i, all
        # five attributes right for 0.171 of 450 seen-pair prompts against 0.142 (position 0.51
        # against 0.44; benchmarks/decoder_oracle.py); the demo's 3,000 steps, 0.200 against
        # 0.149, and end to end 0.149 against 0.111.
        c.diffusion.timestep_power = 0.5
        # A third level at 4 px (64 channels) with attention at 8 and 4 px: in the demo's 3,000
        # steps, given the true z_i, all five right for 0.253 of 450 seen-pair prompts against
        # 0.200 with two levels (position 0.58 against 0.53, shape 0.45 against 0.40), for
        # 1.1x the train time (13:13 against 11:56 on a slow afternoon).
        c.model.update(channel_mult=(2, 2, 2), attention_resolutions=(8, 4))
        c.sampling.steps = "25"
        # lr 5e-4 and Adam's b2 0.99 rather than 1e-3 and 0.999: batch 16 is a noisy gradient,
        # and 32 (twice the compute) drew far better (all five 0.402 against 0.216 on a GPU).
        # At the demo's 3,000 steps, given the true z_i, all five right for 0.318 of 450
        # seen-pair prompts against 0.249 (shape 0.50 against 0.45, position 0.66 against
        # 0.56; benchmarks/README.md, "What the decoder's budget buys"), at no cost.
        c.optim.update(lr=5e-4, b2=0.99, warmup_steps=100, schedule="cosine")
        # Batch 16 at 0.39 s a step on 2 cores (32: 0.84 s; both on pixels, not patches): this
        # early, 1,000 steps of 16 sample about as well as 1,000 of 32 (all five attributes
        # right 6% both; colour 60% against 84%, position 26% against 20%), in half the time.
        c.train.update(batch_size=16, steps=4_000)
        # 32 channels at every level (were 64): half the step's cost (0.095 s against 0.19 on
        # 2 cores), so the demo trains twice the steps (8,000, `demo.PRESETS`) in the same
        # wall. Given the true z_i, all five right for 0.360 and 0.353 of 450 seen-pair
        # prompts (two seeds) against 0.331 for 64 channels at 4,000 steps, and it samples
        # 2.6x faster (benchmarks/README.md, "Sampling the 4,000-step demo").
        c.model.channel_mult = (1, 1, 1)
        # A 16-channel full-resolution head after the patched U-Net (`model.pixel_head`: two
        # 3x3 convolutions at 32 px reading the unstacked output next to x_t). The patches
        # left the decoder rounding small shapes' tips and corners even from a nearly clean
        # x_t (its x0 from real images noised to t = 50: small triangles read right 0.47,
        # the noisy input itself 0.99). Given the true z_i, 8,000 steps, all five right for
        # 0.458 and 0.438 (two seeds) of 450 seen-pair prompts against 0.360 and 0.353 (shape
        # 0.57, size 0.98, position 0.76), for about 5% of the step; 32 channels 0.449
        # (benchmarks/README.md, "A pixel head on the patched decoder").
        c.model.pixel_head = 16
        # Guidance against the empty caption's encoding rather than the dropped caption it
        # trained on: given the true z_i, all five right for 0.687 against 0.627 and, on a
        # second demo decoder, 0.682 against 0.638 of 450 seen-pair prompts (large squares
        # 0.79 against 0.59, 0.87 against 0.69); end to end 0.687 against 0.604. Why the
        # unseen empty caption makes the better contrast is not known (README, "The demo").
        c.sampling.uncond_text = "empty"
        # Outlines weigh 1 + 8 in the loss (`diffusion.edge_weight`; flat pixels 1): an 8 px
        # square's corners are a few pixels of a 32 x 32 MSE, and the decoder drew them round
        # at every budget tried. Given the true z_i, 8,000 steps, 450 seen-pair prompts: all
        # five right for 0.778 against 0.682 (small triangles 0.75 against 0.43, small squares
        # 0.24 against 0.07), each at its best guidance, 2 here against 3 before: with the
        # outlines weighted guidance 3 left grain on the backgrounds whose stray pixels moved
        # the object's box (position 0.94; benchmarks/README.md, "Outlines weighted").
        c.diffusion.edge_weight = 8.0
        c.sampling.guidance_scale = 2.0
        # The caption dropped 20% of the time rather than the paper's 50%: the caption names
        # the shape, which z_i tells apart least (small squares from circles), and the sampler
        # guides on both, so more of the run trains on both. The demo's 12,000 steps, given
        # the true z_i, its sampler (`demo.SAMPLING`), two draws of 450 seen-pair prompts:
        # all five right 0.934, 0.901 and 0.926 against 0.909, 0.853 and 0.864 (train seeds
        # 0, 1, 2); small squares 0.61-0.76 against 0.47-0.59 (benchmarks/README.md, "The
        # caption dropped less").
        c.guidance.text_drop_prob = 0.2
    elif arg == "tiny":
        c.model.update(
            resolution=16,
            channels=16,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(8,),
            head_channels=8,
            num_groups=8,
            clip_dim=16,
            context_dim=16,
            text_width=16,
            text_layers=1,
            text_heads=2,
            text_tokens=16,
            vocab_size=600,
        )
        c.data.update(resolution=32, train_size=64, test_size=54)
        c.samples.update(every=0, num=2)
        c.sampling.steps = "4"
        c.train.update(steps=4, batch_size=8, checkpoint_every=2, log_every=1)
    elif arg == "paper":
        # Table 3 / Appendix C: 3.5B; 512 channels, 3 res blocks, mult 1,2,3,4, attention at
        # 32,16,8 with 64 channels per head, dropout 0.1; batch 2048, 800K steps, lr 1.2e-4,
        # EMA 0.9999; 250 strided sampling steps; guidance 1.25 for the MS-COCO FID.
        c.model.update(
            resolution=64,
            channels=512,
            channel_mult=(1, 2, 3, 4),
            num_res_blocks=3,
            attention_resolutions=(32, 16, 8),
            head_channels=64,
            clip_dim=1024,
            context_dim=2048,
            text_width=2048,
            text_layers=24,  # GLIDE's 1.2B caption transformer: 2.3B U-Net + 1.2B = 3.5B
            text_heads=32,
            text_tokens=128,
            vocab_size=50257,
        )
        c.sampling.update(steps="250", guidance_scale=1.25)
        c.data.update(dataset="image_text", cache=False, resolution=64)
        c.samples.every = 10_000
        c.train.update(steps=800_000, batch_size=2048, checkpoint_every=5_000, log_every=100)
        c.optim.update(lr=1.2e-4, warmup_steps=10_000, ema_decay=0.9999)
        # 3.5B params + Adam: shard params and optimizer state over every device (FSDP; the
        # batch is split over data x fsdp either way).
        c.mesh.update(data=1, fsdp=-1)
    elif arg == "karlo":
        # kakaobrain/karlo-v1-alpha decoder (diffusers UNet2DConditionModel + text_proj):
        # 320,640,960,1280 channels, 3 layers per block, attention at 32,16,8 with head dim 64,
        # z_i into the time embedding and 4 context tokens; CLIP ViT-L/14 text states;
        # learned-range variance; 25 steps of UnCLIPScheduler, guidance 8.0 against the empty
        # caption.
        c.model.update(
            resolution=64,
            channels=320,
            channel_mult=(1, 2, 3, 4),
            num_res_blocks=3,
            attention_resolutions=(32, 16, 8),
            head_channels=64,
            clip_dim=768,
            context_dim=1536,
            unit_z_i=False,
            text_encoder="clip",
            text_width=768,
            text_layers=12,
            text_heads=12,
            text_tokens=77,
            vocab_size=49408,
        )
        c.sampling.update(steps="25", method="karlo", guidance_scale=8.0, uncond_text="empty")
        c.data.update(dataset="image_text", cache=False, resolution=64)
        c.samples.every = 10_000
        c.train.update(steps=800_000, batch_size=2048, checkpoint_every=5_000, log_every=100)
        c.optim.update(lr=1.2e-4, warmup_steps=10_000, ema_decay=0.9999)
        c.mesh.update(data=1, fsdp=-1)
    return c


def sweep():
    """Learning rate x dropout, on top of the chosen variant."""
    for lr in (1e-4, 3e-4):
        for dropout in (0.0, 0.1):
            yield {"optim.lr": lr, "model.dropout": dropout}
