"""The FID Inception: pytorch-fid's features from its state dict (.pth and .safetensors), and
clear errors for a file that is not that state dict."""

import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from unclip_jax.evaluation.inception import (
    FEATURES,
    inception_features,
    load_inception,
    state_dict_shapes,
)


def _torch_fid_inception():
    """A transcription of pytorch-fid's `fid_inception_v3` (torchvision's Inception3 with
    pytorch_fid/inception.py's FIDInceptionA/C/E_1/E_2 blocks, aux_logits=False, 1008 classes)
    and of `InceptionV3.forward` up to pool3 (block 3), as (model, pool3)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class BasicConv2d(nn.Module):
        def __init__(self, in_channels, out_channels, **kwargs):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
            self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)), inplace=True)

    class FIDInceptionA(nn.Module):
        def __init__(self, in_channels, pool_features):
            super().__init__()
            self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
            self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
            self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
            self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

        def forward(self, x):
            branch1x1 = self.branch1x1(x)
            branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
            branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            # Patch: TF's average pooling does not count the padding.
            branch_pool = F.avg_pool2d(
                x, kernel_size=3, stride=1, padding=1, count_include_pad=False
            )
            branch_pool = self.branch_pool(branch_pool)
            return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)

    class InceptionB(nn.Module):
        def __init__(self, in_channels):
            super().__init__()
            self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            branch3x3 = self.branch3x3(x)
            branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
            return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)

    class FIDInceptionC(nn.Module):
        def __init__(self, in_channels, channels_7x7):
            super().__init__()
            c7 = channels_7x7
            self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
            self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
            self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
            self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

        def forward(self, x):
            branch1x1 = self.branch1x1(x)
            branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            branch7x7dbl = self.branch7x7dbl_1(x)
            branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
            branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
            # Patch: TF's average pooling does not count the padding.
            branch_pool = F.avg_pool2d(
                x, kernel_size=3, stride=1, padding=1, count_include_pad=False
            )
            branch_pool = self.branch_pool(branch_pool)
            return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)

    class InceptionD(nn.Module):
        def __init__(self, in_channels):
            super().__init__()
            self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
            self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
            self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
            branch7x7x3 = self.branch7x7x3_2(self.branch7x7x3_1(x))
            branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(branch7x7x3))
            branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
            return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)

    class InceptionE(nn.Module):
        """pytorch-fid's FIDInceptionE_1 (pool "avg") and FIDInceptionE_2 (pool "max")."""

        def __init__(self, in_channels, pool):
            super().__init__()
            self.pool_kind = pool
            self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
            self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
            self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

        def pool(self, x):
            if self.pool_kind == "avg":  # TF's average pooling does not count the padding
                return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            # The FID Inception max-pools in its last block (pytorch-fid: "likely an error").
            return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)

        def forward(self, x):
            branch1x1 = self.branch1x1(x)
            branch3x3 = self.branch3x3_1(x)
            branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
            branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            branch3x3dbl = torch.cat(
                [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1
            )
            branch_pool = self.branch_pool(self.pool(x))
            return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)

    class FIDInception3(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
            self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
            self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
            self.Mixed_5b = FIDInceptionA(192, pool_features=32)
            self.Mixed_5c = FIDInceptionA(256, pool_features=64)
            self.Mixed_5d = FIDInceptionA(288, pool_features=64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
            self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
            self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
            self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b = InceptionE(1280, pool="avg")
            self.Mixed_7c = InceptionE(2048, pool="max")
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(2048, 1008)

    model = FIDInception3().eval()

    def pool3(images):
        """pytorch_fid.inception.InceptionV3([3]).forward on (N, 3, H, W) floats in [0, 1]."""
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1"):
            x = getattr(model, name)(x)
        for name in ("Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2"):
            x = getattr(model, name)(x)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(model, f"Mixed_{name}")(x)
        return model.avgpool(x)[:, :, 0, 0]

    return model, pool3


def _randomise(model, seed: int) -> None:
    """He-normal convolutions and random BatchNorm affines and running statistics, so that
    every BatchNorm term matters and activations keep their scale through the depth."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("conv.weight"):
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif name.endswith(("bn.bias", "bn.running_mean")) or name.startswith("fc."):
                t.copy_(0.1 * torch.randn(t.shape, generator=gen))
            elif name.endswith(("bn.weight", "bn.running_var")):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))


@pytest.fixture(scope="module")
def torch_model(tmp_path_factory):
    """(pool3 function, .pth path, .safetensors path) of a randomly weighted FID Inception."""
    torch = pytest.importorskip("torch", reason="needs the peers extra: pip install -e '.[peers]'")
    torch.set_num_threads(2)
    model, pool3 = _torch_fid_inception()
    _randomise(model, seed=0)
    state = model.state_dict()
    folder = tmp_path_factory.mktemp("inception")
    pth, safe = str(folder / "pt_inception.pth"), str(folder / "pt_inception.safetensors")
    torch.save(state, pth)
    save_file({k: v.numpy() for k, v in state.items()}, safe)
    return pool3, pth, safe


def _reference(pool3, images: list[np.ndarray]) -> np.ndarray:
    """pytorch-fid's pool3 of each uint8 image (ToTensor's division by 255, one at a time)."""
    import torch

    with torch.no_grad():
        return np.concatenate(
            [pool3(torch.from_numpy(im[None]).permute(0, 3, 1, 2).float() / 255) for im in images]
        )


def _images() -> list[np.ndarray]:
    """Two unlike 64x64 images (upsampled to 299 on the way in): noise, and 8x8 blocks."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    blocks = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    return [noise, blocks]


def _tolerance(want: np.ndarray) -> float:
    # float32 through ~40 convolution + BatchNorm layers on two backends (oneDNN, XLA) rounds
    # differently by ~1e-6 of the feature scale (max |feature|); the architectural slips this
    # guards against move features by percents of it (counting the pools' padding: 3%,
    # Mixed_7c average- instead of max-pooling: 17%, measured on these weights).
    return 1e-4 * float(np.abs(want).max())


def test_features_match_pytorch_fid(torch_model):
    pool3, pth, safe = torch_model
    images = _images()
    want = _reference(pool3, images)
    tol = _tolerance(want)
    # The comparison means something: the two images' features differ by far more than tol.
    assert want.shape == (2, FEATURES) and np.abs(want[0] - want[1]).max() > 100 * tol

    for path in (pth, safe):
        got = inception_features(load_inception(path), images, batch_size=2)
        assert got.shape == (2, FEATURES) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def test_mixed_sizes_match_pytorch_fid(torch_model):
    """A batch of differently sized images (resized on the host, not on the devices) gives
    each image's features as pytorch-fid computes them alone."""
    pool3, _, safe = torch_model
    noise, blocks = _images()
    images = [noise, np.ascontiguousarray(blocks[:40, :56])]
    want = _reference(pool3, images)
    got = inception_features(load_inception(safe), images, batch_size=2)
    np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance(want))


def test_state_dict_shapes_are_pytorch_fids(torch_model):
    """`load_inception`'s table of tensors is the transcribed model's state dict, less the
    classifier and the BatchNorm step counters."""
    import torch

    state = torch.load(torch_model[1], map_location="cpu", weights_only=True)
    want = {
        k: tuple(v.shape)
        for k, v in state.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    assert state_dict_shapes() == want


def test_missing_file_is_named(tmp_path):
    path = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(FileNotFoundError, match=r"pt_inception-2015-12-05-6726825d\.pth"):
        load_inception(path)


def test_pth_without_torch_says_what_to_do(tmp_path, monkeypatch):
    path = tmp_path / "pt_inception.pth"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match=r"pt_inception\.pth.*install torch.*safetensors"):
        load_inception(str(path))


@pytest.fixture(scope="module")
def zero_state():
    """A well-formed state dict (zeros) in the layout `load_inception` reads."""
    state = {k: np.zeros(shape, np.float32) for k, shape in state_dict_shapes().items()}
    state["fc.weight"], state["fc.bias"] = np.zeros((1008, 2048), np.float32), np.zeros(1008)
    return state


def test_missing_tensor_is_named(tmp_path, zero_state):
    state = dict(zero_state)
    del state["Mixed_6c.branch7x7dbl_3.bn.running_var"]
    path = str(tmp_path / "w.safetensors")
    save_file(state, path)
    with pytest.raises(
        ValueError, match=r"w\.safetensors.*Mixed_6c\.branch7x7dbl_3\.bn\.running_var"
    ):
        load_inception(path)


def test_wrong_shape_is_named(tmp_path, zero_state):
    state = dict(zero_state)
    state["Mixed_5b.branch5x5_2.conv.weight"] = np.zeros((64, 48, 3, 3), np.float32)
    path = str(tmp_path / "w.safetensors")
    save_file(state, path)
    with pytest.raises(ValueError, match=r"w\.safetensors.*Mixed_5b\.branch5x5_2\.conv\.weight"):
        load_inception(path)


def test_unexpected_tensor_is_named(tmp_path, zero_state):
    state = dict(zero_state)
    state["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    path = str(tmp_path / "w.safetensors")
    save_file(state, path)
    with pytest.raises(ValueError, match=r"w\.safetensors.*AuxLogits\.fc\.weight"):
        load_inception(path)


def test_eval_adds_fid_in_inception_features(tmp_path):
    """`unclip-jax eval --inception FILE`: real pictures scored as samples are at FID 0, and
    other pictures are not (random He-scaled weights, so the features depend on the pixels)."""
    import json
    import os

    from PIL import Image

    from unclip_jax.cli import main
    from unclip_jax.data.shapes import render_example

    rng = np.random.default_rng(0)
    state = {}
    for key, shape in state_dict_shapes().items():
        if key.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            state[key] = rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32)
        elif key.endswith("running_var") or key.endswith("bn.weight"):
            state[key] = np.ones(shape, np.float32)
        else:
            state[key] = np.zeros(shape, np.float32)
    weights = str(tmp_path / "inception.safetensors")
    save_file(state, weights)

    def write(folder, examples):
        os.makedirs(folder)
        with open(os.path.join(folder, "manifest.jsonl"), "w", encoding="utf-8") as f:
            for i, e in enumerate(examples):
                Image.fromarray(e["image"]).save(os.path.join(folder, f"{i}.png"))
                f.write(json.dumps({"file": f"{i}.png", "prompt": e["caption"]}) + "\n")

    real = [render_example(split="test", index=i, resolution=32) for i in range(6)]
    write(str(tmp_path / "same"), real)
    write(str(tmp_path / "other"), [dict(e, image=255 - e["image"]) for e in real])
    from clip_fixture import write_random_clip

    clip = write_random_clip(str(tmp_path / "clip"))
    scores = {}
    for name in ("same", "other"):
        out = str(tmp_path / f"{name}.json")
        args = ["eval", "--samples", str(tmp_path / name), "--clip", clip, "--real", "shapes:32"]
        args += ["--num-real", "6", "--num-probe", "0", "--inception", weights, "--out", out]
        args += ["--shapes-train-size", "64", "--shapes-test-size", "54"]
        args += ["--data-dir", str(tmp_path / "data")]
        assert main(args) == 0
        with open(out, encoding="utf-8") as f:
            scores[name] = json.load(f)["frechet_inception"]
    assert abs(scores["same"]) < 1e-3 * scores["other"]
    missing = ["eval", "--samples", str(tmp_path / "same"), "--clip", clip, "--real", "shapes:32"]
    assert main([*missing, "--inception", str(tmp_path / "none.pth")]) == 2
