"""Installs unclip_jax: unCLIP (DALL-E 2) in JAX/Flax.

Version ranges are the ones checked on the project's machines (Python 3.11, 2026-11): the lower
bound is the release the test suite ran against, the upper bound the next minor or major that
has not been checked.
"""

import pathlib

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.0,<0.11",
    "jaxlib>=0.10.0,<0.11",
    "flax>=0.12.0,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.0,<0.13",
    "ml_collections>=1.1.0,<2",
    "absl-py>=2.1,<3",
    # tfds without TensorFlow: builders write array_record, `tfds.data_source` reads it.
    "tensorflow-datasets>=4.9.7,<4.10",
    "array_record>=0.8.0,<0.9",
    # tfds's builders locate their code with importlib_resources (installed with TF otherwise).
    "importlib_resources>=6.4,<8",
    "grain>=0.2.12,<0.3",
    "tokenizers>=0.22,<0.24",
    "safetensors>=0.6,<0.9",
    "pillow>=11,<14",
    "numpy>=2.0,<3",
    "tqdm>=4.67,<5",
    # TensorBoard event files without TensorFlow.
    "tensorboardX>=2.6.2,<3",
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8.3,<10", "pytest-xdist>=3.6,<4", "ruff>=0.15,<0.18", "scipy>=1.14,<2"],
    # TPU VMs: libtpu, and gcsfs so that a workdir on gs:// works (orbax and etils.epath).
    # libtpu alone also lets `unclip-jax plan` compile for TPU topologies on any machine.
    "tpu": ["jax[tpu]>=0.10.0,<0.11", "gcsfs>=2024.2"],
    "gcs": ["gcsfs>=2024.2"],
    "cuda": ["jax[cuda12]>=0.10.0,<0.11"],
    "cuda13": ["jax[cuda13]>=0.10.0,<0.11"],
    # Only for parity tests and benchmarks against the PyTorch implementations. torch 2.13.0
    # for CPU lies on the project machines' disk, so this installs without a CUDA download.
    "peers": ["torch==2.13.0", "diffusers>=0.42,<0.43", "transformers>=5.0,<6"],
}

setup(
    name="unclip_jax",
    version="0.1.0",
    description="unCLIP (Hierarchical Text-Conditional Image Generation with CLIP Latents) in JAX/Flax",
    long_description=pathlib.Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["unclip_jax", "unclip_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["unclip-jax=unclip_jax.cli:main"]},
)
