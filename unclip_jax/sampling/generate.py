"""Sharded generation to disk: any number of prompts, global batches over every device and
process, each image written exactly once, resumable.

Image (p, j) (prompt p, sample j) is `P{p:06d}_{j:02d}.png` in the output folder. Process 0
lists the images not yet on disk and tells every process; each global batch is split over the
mesh's batch axes, every process tokenizes and feeds its own rows and writes the images its
devices made (one replica of each). A PNG is written to a temporary name and renamed, so a
killed run leaves only whole images, and a rerun makes only the missing ones, the same ones
it would have made (an image's randomness is its own, see `cascade`). Before the first image
process 0 records `settings.json` and `prompts.jsonl`, and refuses a folder made with other
settings or other prompts; at the end it writes `manifest.jsonl` (one line per image on
disk). The folder must be on a file system every process sees (GCS, NFS).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from unclip_jax.config import ConfigError
from unclip_jax.data.images import to_uint8
from unclip_jax.data.show import caption_grid
from unclip_jax.embed_job import pad_rows
from unclip_jax.parallel import global_batch
from unclip_jax.parallel.batch import batch_sharding, process_batch_rows
from unclip_jax.sampling.cascade import Cascade, image_keys

log = logging.getLogger("unclip_jax.sample")

MANIFEST, SETTINGS_FILE, GRID = "manifest.jsonl", "settings.json", "grid.png"
PROMPTS_FILE = "prompts.jsonl"  # the run's prompts, one JSON string per line
# A grid of the prompts is written when the run has at most this many images, in cells of at
# most GRID_CELL pixels.
GRID_MAX, GRID_CELL = 256, 128


@dataclasses.dataclass(frozen=True)
class GenerationReport:
    """What a run wrote: images made now, images already on disk, the output folder."""

    written: int
    skipped: int
    out: str


def image_name(prompt: int, sample: int) -> str:
    """The file of image (prompt, sample)."""
    return f"P{prompt:06d}_{sample:02d}.png"


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {path!r} has no prompts")
    return prompts


def _check_settings_file(out: str, settings: dict[str, Any]) -> None:
    """A folder made with other settings must not be resumed into (its images would mix)."""
    path = os.path.join(out, SETTINGS_FILE)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    if saved != settings:
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        raise ConfigError(
            f"{out} holds images made with other settings ({', '.join(changed)} differ): "
            "use another --out, or the settings in its settings.json"
        )


def _todo(out: str, num_prompts: int, n: int) -> np.ndarray:
    """(M, 2) [prompt, sample] of the images not on disk, as process 0 sees the folder."""
    if jax.process_index() == 0:
        have = set(os.listdir(out)) if os.path.isdir(out) else set()
        todo = np.array(
            [(p, j) for p in range(num_prompts) for j in range(n) if image_name(p, j) not in have],
            np.int32,
        ).reshape(-1, 2)
    else:
        todo = np.zeros((0, 2), np.int32)
    if jax.process_count() > 1:
        count = int(multihost_utils.broadcast_one_to_all(np.int32(len(todo))))
        padded = np.zeros((count, 2), np.int32)
        padded[: len(todo)] = todo
        todo = np.asarray(multihost_utils.broadcast_one_to_all(padded))
    return todo


def _write_png(path: str, pixels: np.ndarray) -> None:
    # A hidden name without the .png ending: a killed run leaves nothing an FID tool would read.
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    Image.fromarray(pixels).save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _check_prompts(out: str, prompts: Sequence[str]) -> list[str]:
    """The prompts the folder's images were made for, which must start the new list (prompts
    may be added at the end): the longer of the two lists is returned, to be kept."""
    path = os.path.join(out, PROMPTS_FILE)
    if not os.path.exists(path):
        return list(prompts)
    with open(path, encoding="utf-8") as f:
        saved = [json.loads(line) for line in f]
    for p, (old, new) in enumerate(zip(saved, prompts, strict=False)):
        if old != new:
            raise ConfigError(
                f"{out} holds images of prompt {p} {old!r}, now {new!r}: use another --out "
                "(prompts may only be added at the end)"
            )
    return list(prompts) if len(prompts) >= len(saved) else saved


def _prepare_folder(out: str, settings: dict[str, Any], prompts: Sequence[str]) -> None:
    """Process 0 checks the folder against the run (settings, prompts), records them before any
    image is written (so a killed run cannot be resumed with others) and removes temporary
    files a killed run left; a refusal is raised on every process. The folder must be on a
    file system every process sees (GCS, NFS): process 0 decides what is missing."""
    error = ""
    if jax.process_index() == 0:
        try:
            os.makedirs(out, exist_ok=True)
            _check_settings_file(out, settings)
            kept = _check_prompts(out, prompts)
            _write_text(os.path.join(out, SETTINGS_FILE), json.dumps(settings, indent=2))
            lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in kept)
            _write_text(os.path.join(out, PROMPTS_FILE), lines)
            for name in os.listdir(out):
                if name.startswith(".") and ".tmp-" in name:
                    os.remove(os.path.join(out, name))
        except (ConfigError, OSError) as err:
            error = str(err) or repr(err)
    if jax.process_count() > 1:
        encoded = np.zeros(4096, np.uint8)
        raw = error.encode()[:4096]
        encoded[: len(raw)] = np.frombuffer(raw, np.uint8)
        encoded = np.asarray(multihost_utils.broadcast_one_to_all(encoded))
        error = bytes(encoded[encoded > 0]).decode(errors="replace")
    if error:
        raise ConfigError(error)
    os.makedirs(out, exist_ok=True)


def generate_to_dir(
    cascade: Cascade,
    prompts: Sequence[str],
    out: str,
    *,
    n: int = 1,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
) -> GenerationReport:
    """Makes `n` images for each prompt into `out` (skipping those already there).

    `batch_size` is the global batch (default: 4 per batch shard of the mesh), rounded up to a
    multiple of the mesh's batch shards; the last batch is padded with repeats whose images
    are not written. Every process calls this with the same arguments.
    """
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    if not prompts:
        raise ConfigError("no prompts")
    multiple = cascade.batch_multiple
    batch = batch_size or 4 * multiple
    batch = -(-batch // multiple) * multiple
    if batch % jax.process_count():
        raise ConfigError(f"batch {batch} does not split over {jax.process_count()} processes")
    settings = {"seed": seed, "n": n, "cascade": cascade.describe()}
    settings = json.loads(json.dumps(settings, default=str))
    _prepare_folder(out, settings, prompts)
    todo = _todo(out, len(prompts), n)
    total = len(prompts) * n
    rows = process_batch_rows(batch_sharding(cascade.mesh), batch)
    bar = None
    if progress and jax.process_index() == 0 and len(todo):
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="sample", unit="img")
    written = 0
    make_keys = jax.jit(image_keys, static_argnums=0)
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        valid = len(chunk)
        chunk = pad_rows(chunk, batch - valid)
        local = chunk[rows]
        tokens = cascade.tokenize([prompts[p] for p in local[:, 0]])
        tokens, ids = global_batch((tokens, local), cascade.mesh)
        with cascade.context():
            keys = make_keys(seed, ids)
        images = cascade.generate(tokens, keys)
        for shard in images.addressable_shards:
            if shard.replica_id:
                continue
            first = shard.index[0].start or 0
            data = to_uint8(np.asarray(shard.data))
            for r in range(data.shape[0]):
                if first + r >= valid:
                    continue
                p, j = chunk[first + r]
                _write_png(os.path.join(out, image_name(int(p), int(j))), data[r])
                written += 1
        if bar is not None:
            bar.update(valid)
    if bar is not None:
        bar.close()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("generated")
    if jax.process_index() == 0:
        _write_manifest(out, prompts, n, seed)
    return GenerationReport(written=written, skipped=total - len(todo), out=out)


def _write_manifest(out: str, prompts: Sequence[str], n: int, seed: int) -> None:
    """manifest.jsonl (every image on disk, in prompt order) and, for small runs, grid.png
    with each prompt under its image (cells of at most 128 px)."""
    have = set(os.listdir(out))
    lines, grid_images, grid_captions = [], [], []
    for p, prompt in enumerate(prompts):
        for j in range(n):
            name = image_name(p, j)
            if name not in have:
                continue
            lines.append({"file": name, "prompt": prompt, "seed": seed, "index": p, "sample": j})
            if len(prompts) * n <= GRID_MAX:
                with Image.open(os.path.join(out, name)) as image:
                    image = image.convert("RGB")
                    image.thumbnail((GRID_CELL, GRID_CELL))
                    grid_images.append(np.asarray(image))
                grid_captions.append(prompt)
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    _write_text(os.path.join(out, MANIFEST), text)
    if grid_images:
        scale = max(1, GRID_CELL // grid_images[0].shape[0])
        grid = caption_grid(grid_images, grid_captions, columns=n if n > 1 else None, scale=scale)
        grid.save(os.path.join(out, GRID))
