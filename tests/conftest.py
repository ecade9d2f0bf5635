"""Test set-up: 8 fake CPU devices for the sharding tests (before JAX starts), and
one compilation cache for the whole run, shared by the xdist workers and the
subprocesses they start (the CLI, multi-process workers), so the same train
step is compiled once per run rather than once per test.  The cache is a
fresh temporary directory, removed by the process that made it, and so is
the run's ``TMPDIR``: what libraries leave in the temporary directory (TFDS's
``mkdtemp``) goes with it.

XLA's CPU backend compiles at optimisation level 0 in the tests (and in the
subprocesses they start, through ``TEST_SUBPROCESS_XLA_FLAGS``): the programs
are tiny, so compiling dominates, and level 0 compiles them in about two
thirds of the time.  The computation is the same program; every comparison
in the tests is between runs compiled alike, or against a tolerance.

Likewise numba compiles the merge kernels as plain loops rather than
row-parallel ones (``RESEARCH_MERGE_CPU=serial``): the parallel transform is
most of their compile time, and the bits are the same (one test compiles
both and compares them).  The kernels, their generated modules and numba's
machine code are kept in the run's temporary directory, so that every run
compiles what it uses, as CI does, and nothing is written to the user's
cache or the source tree."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TEST_SUBPROCESS_XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + os.environ["TEST_SUBPROCESS_XLA_FLAGS"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _shared_tmp(var: str, prefix: str) -> None:
    if var not in os.environ:  # the first process (the xdist controller) makes it; workers inherit it
        os.environ[var] = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, os.environ[var], True)


_shared_tmp("RESEARCH_TEST_TMPDIR", "research-tests-")
os.environ["TMPDIR"] = os.environ["RESEARCH_TEST_TMPDIR"]
tempfile.tempdir = None  # tempfile caches the directory it found first

# merge CLI runs keep compiled programs here, not in the user's ~/.cache
_shared_tmp("RESEARCH_MERGE_CACHE", "research-merge-cache-")
os.environ.setdefault("RESEARCH_MERGE_CPU", "serial")
_shared_tmp("RESEARCH_KERNEL_DIR", "research-kernels-")
_shared_tmp("NUMBA_CACHE_DIR", "research-numba-cache-")
_shared_tmp("JAX_COMPILATION_CACHE_DIR", "research-jax-cache-")
os.environ.setdefault("RESEARCH_JAX_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])  # experiments/quickstart.py
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


# The longest test files, longest first (by pytest --durations on 2 CPU cores).
# ``make test`` hands whole files to its two workers in collection order
# (--dist loadfile --no-loadscope-reorder), so these start first and no long
# file starts last while the other worker idles.
LONGEST_FIRST = ("test_training.py", "test_merging_cpu_backend.py", "test_experiments.py", "test_demo.py",
                 "test_models.py", "test_readme.py", "test_lora.py", "test_notebook.py", "test_merge_stream.py",
                 "test_multihost.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))  # stable: order within kept
