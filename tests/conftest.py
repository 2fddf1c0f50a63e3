"""Test set-up: 8 fake CPU devices and a persistent compilation cache, before JAX starts."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("UNCLIP_JAX_TEST_CACHE", os.path.expanduser("~/.cache/unclip_jax/jax_tests")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
