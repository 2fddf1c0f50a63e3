"""A random tiny CLIP directory (configs/clip.py:tiny sizes, a BPE on shapes captions) for
stages that condition on a CLIP, without training one."""

from __future__ import annotations

import os

import flax.linen as nn
import jax

from unclip_jax.clip import save_pretrained
from unclip_jax.config import load_config
from unclip_jax.data.shapes import example_layout, make_caption
from unclip_jax.models.clip import CLIP, ClipConfig, init_params
from unclip_jax.models.clip_tokenizer import ClipTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_random_clip(path: str, seed: int = 0) -> str:
    """Writes a randomly initialised tiny CLIP in Hugging Face's layout to `path`."""
    model = load_config(f"{ROOT}/configs/clip.py:tiny").model.to_dict()
    captions = [
        make_caption(layout.labels, template=layout.template)
        for layout in (example_layout(split="train", index=i) for i in range(400))
    ]
    tokenizer = ClipTokenizer.train(captions, vocab_size=model["vocab_size"])
    config = ClipConfig.from_model_config(
        {**model, "vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_id}
    )
    params = nn.meta.unbox(init_params(CLIP(config), jax.random.key(seed)))
    save_pretrained(path, config, params, tokenizer)
    return path
