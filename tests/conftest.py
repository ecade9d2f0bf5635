"""Test set-up: 8 fake CPU devices for the sharding tests (before JAX starts)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# merge CLI runs keep compiled programs here, not in the user's ~/.cache
os.environ.setdefault("RESEARCH_MERGE_CACHE", tempfile.mkdtemp(prefix="research-merge-cache-"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
