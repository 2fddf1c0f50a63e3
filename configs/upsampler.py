"""The diffusion upsamplers: 64->256 and 256->1024, unconditional on text, no attention.

Variants: tiny (tests, 8->32), shapes (CPU demo, 32->128), paper (Table 3's 64->256),
paper_1024 (Table 3's 256->1024), karlo (Karlo's super-res 64->256, diffusers layout).
They train on random crops of 1/4 of the target size and run on whole images.
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

VARIANTS = ("tiny", "shapes", "paper", "paper_1024", "karlo")


def get_config(arg: str = "shapes") -> ml_collections.ConfigDict:
    """The upsampler config for variant `arg`."""
    if arg not in VARIANTS:
        raise unknown_variant(arg, VARIANTS, stage="upsampler")
    c = ml_collections.ConfigDict()
    c.stage = "upsampler"
    c.variant = arg
    # The base block is the CPU demo's (`shapes`): the shapes decoder's 32 px -> 128 px, 4x
    # as in the paper's first stage.
    c.model = dict(
        low_resolution=32,
        resolution=128,
        channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        dropout=0.0,
        num_groups=8,
        # ResBlocks condition on t by scale-shift norm (ADM's default) or, False, by adding the
        # time embedding before norm2 (Karlo's super-res U-Nets).
        scale_shift=True,
        patch_size=1,  # U-Net on patch_size^2 pixels stacked on channels (not in the paper)
        # A second U-Net of the same shape for the last sampling step (Karlo's super_res_last,
        # imported by `unclip-jax convert karlo`; training trains one U-Net and refuses it).
        last_step_unet=False,
    )
    # The low-res input is corrupted in training: "blur" (Gaussian, kernel 3, sigma 0.6; the
    # first stage) or "bsr" (random blur, resize and noise; the second stage).
    c.degradation = dict(kind="blur", blur_kernel=3, blur_sigma=0.6)
    c.train_crop = 32  # train on random crops of 1/4 of the target size (paper, Section C)
    c.diffusion = diffusion_block(schedule="cosine")
    c.sampling = sampling_block(steps="ddim27", method="ddim")
    # Images at data.resolution (= model.resolution); the low-res view is derived from them.
    c.data = image_data_block(resolution=128, train_size=10_000, test_size=540)
    # Grids of [bicubic low-res | EMA sample | original] on the first `num` test images at the
    # full resolution, every `every` steps and at the end (0: never).
    c.samples = dict(every=1_000, num=4)
    c.train = train_block(steps=3_000, batch_size=32, checkpoint_every=500, log_every=50)
    c.mesh = mesh_block()
    c.optim = optim_block(lr=5e-4, warmup_steps=200, ema_decay=0.999)
    if arg == "shapes":
        # v-prediction, as the shapes decoder: after 300 steps the eps model's samples kept
        # x_T's noise and tint in flat backgrounds (the demo read 34% of backgrounds right
        # through it, 100% in the decoder's own 32 px output).
        c.diffusion.prediction = "v"
    elif arg == "tiny":
        c.model.update(
            low_resolution=8,
            resolution=32,
            channels=16,
            channel_mult=(1, 2),
            num_res_blocks=1,
            num_groups=8,
        )
        c.train_crop = 8
        c.data.update(resolution=32, train_size=64, test_size=54)
        c.samples.update(every=0, num=2)
        c.sampling.steps = "ddim4"
        c.train.update(steps=4, batch_size=8, checkpoint_every=2, log_every=1)
    elif arg == "paper":
        # Table 3, 64->256: cosine, 320 channels, depth 3, mult 1,2,3,4, dropout 0.1, 700M;
        # DDIM 27 steps; Gaussian blur corruption.
        c.model.update(
            low_resolution=64,
            resolution=256,
            channels=320,
            channel_mult=(1, 2, 3, 4),
            num_res_blocks=3,
            dropout=0.1,
            num_groups=32,
        )
        c.train_crop = 64
        c.data.update(dataset="image_text", cache=False, resolution=256, train_size=0, test_size=0)
        c.samples.every = 10_000
        c.mesh.update(data=1, fsdp=-1)  # shard params and optimizer state (FSDP)
        c.train.update(steps=1_000_000, batch_size=1024, checkpoint_every=5_000, log_every=100)
        c.optim.update(lr=1.2e-4, warmup_steps=10_000, ema_decay=0.9999)
    elif arg == "paper_1024":
        # Table 3, 256->1024: linear schedule, 192 channels, depth 2, mult 1,1,2,2,4,4, 300M;
        # DDIM 15 steps; BSR degradation.
        c.model.update(
            low_resolution=256,
            resolution=1024,
            channels=192,
            channel_mult=(1, 1, 2, 2, 4, 4),
            num_res_blocks=2,
            dropout=0.0,
            num_groups=32,
        )
        c.degradation.kind = "bsr"
        c.train_crop = 256
        c.data.update(dataset="image_text", cache=False, resolution=1024, train_size=0, test_size=0)
        c.samples.every = 10_000
        c.mesh.update(data=1, fsdp=-1)  # shard params and optimizer state (FSDP)
        c.diffusion.schedule = "linear"
        c.sampling.steps = "ddim15"
        c.train.update(steps=1_000_000, batch_size=512, checkpoint_every=5_000, log_every=100)
        c.optim.update(lr=1.2e-4, warmup_steps=10_000, ema_decay=0.9999)
    elif arg == "karlo":
        # kakaobrain/karlo-v1-alpha super_res_first/last (diffusers UNet2DModel, in 6 / out 3):
        # 320,640,960,1280 channels, 3 layers per block, no attention, the time embedding
        # added (resnet_time_scale_shift "default"); 7 steps of UnCLIPScheduler (a converted
        # checkpoint also runs super_res_last for the last one: model.last_step_unet).
        c.model.update(
            low_resolution=64,
            resolution=256,
            channels=320,
            channel_mult=(1, 2, 3, 4),
            num_res_blocks=3,
            dropout=0.0,
            num_groups=32,
            scale_shift=False,
        )
        c.train_crop = 64
        c.sampling.update(steps="7", method="karlo")
        c.data.update(dataset="image_text", cache=False, resolution=256, train_size=0, test_size=0)
        c.samples.every = 10_000
        c.mesh.update(data=1, fsdp=-1)  # shard params and optimizer state (FSDP)
        c.train.update(steps=1_000_000, batch_size=1024, checkpoint_every=5_000, log_every=100)
        c.optim.update(lr=1.2e-4, warmup_steps=10_000, ema_decay=0.9999)
    return c


def sweep():
    """Learning rate x degradation strength, on top of the chosen variant."""
    for lr in (1e-4, 3e-4):
        for sigma in (0.4, 0.6):
            yield {"optim.lr": lr, "degradation.blur_sigma": sigma}
