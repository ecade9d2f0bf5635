"""``python -m research.merging CONFIG.yaml OUT_DIR`` (also ``research-merge``): merge
real checkpoints from a mergekit-style YAML file, streaming tensor by tensor."""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys

from research import stop_signals


def compile_cache_dir() -> str | None:
    """Where compiled merge programs are kept between runs: ``$RESEARCH_MERGE_CACHE``
    (``off`` disables), else ``$XDG_CACHE_HOME/research-merge/jax`` (``~/.cache``)."""
    env = os.environ.get("RESEARCH_MERGE_CACHE")
    if env is not None:
        return None if env.lower() in ("", "off", "0", "none") else env
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "research-merge", "jax")


def _enable_compile_cache() -> None:
    """JAX's persistent compilation cache, for every program however quick to compile:
    a merge compiles one small program per tensor shape."""
    import jax

    path = compile_cache_dir()
    if path is None or jax.config.jax_compilation_cache_dir:  # off, or the user set their own
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _reuse_freed_buffers() -> None:
    """Let glibc's malloc keep freed tensor buffers (up to 32 MB, its limit) on its heap
    for the next tensor, in one arena for every thread, instead of unmapping each
    one and mapping fresh pages that the kernel must zero.  A no-op elsewhere."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)
    mallopt(m_arena_max, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="research-merge", description=__doc__)
    ap.add_argument("config", help="mergekit-style YAML")
    ap.add_argument("out_dir")
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu", "tpu"])
    ap.add_argument("--shard-size", default="5GB")
    ap.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    ap.add_argument("--seed", type=int, default=0, help="for DARE/DELLA")
    ap.add_argument("--dry-run", action="store_true", help="check inputs and print the plan; reads no tensor data")
    ap.add_argument("--allow-vocab-mismatch", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-map", action="store_true",
                    help="copy every input tensor into memory rather than map it from the page cache "
                         "(for inputs that may change while the merge reads them)")
    ap.add_argument("--no-compile-cache", action="store_true",
                    help="do not keep compiled programs between runs (default: $RESEARCH_MERGE_CACHE or "
                         "~/.cache/research-merge/jax)")
    args = ap.parse_args(argv)
    _reuse_freed_buffers()
    # JAX's import allocates ~1M objects that live to the end: collecting during it
    # only re-scans them, and frozen they are left out of later collections
    gc.disable()
    try:
        if not args.no_compile_cache and not args.dry_run:
            _enable_compile_cache()
        from research.merging import MergeError
        from research.merging.stream import ConfigError, MergeFailed, load, parse_size, run
        from research.safetensors_io import CheckpointError
    finally:
        gc.freeze()
        gc.enable()

    try:
        with stop_signals.raising():
            mc = load(args.config)
            out = run(mc, args.out_dir, device=args.device, shard_size=parse_size(args.shard_size), force=args.force,
                      seed=args.seed, dry_run=args.dry_run, allow_vocab_mismatch=args.allow_vocab_mismatch,
                      progress=not args.no_progress, map_inputs=not args.no_map)
    except (ConfigError, MergeFailed, CheckpointError, MergeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP: the output is whole, or its temporary was removed
        return stop_signals.report(stop)
    if out:
        print(f"wrote {out}")
    return 0


def cli() -> int:
    """The ``research-merge`` command: ``main`` in a process that ends with it."""
    rc = main()
    # The interpreter's teardown frees every object still alive, and first
    # collects them all for cycles; frozen, they are left out of that collection.
    gc.freeze()
    return rc


if __name__ == "__main__":
    sys.exit(cli())
