"""orbax checkpoints of (params, optimizer state, data iterator state).

Saved every ``save_every`` steps, the last ``keep`` kept, written
asynchronously; orbax writes each step to a temporary directory and renames
it when complete, so an interrupted save never replaces a good checkpoint.
Restoring takes the *current* shardings as the target, so a run saved on one
mesh resumes on another (orbax reshards).

A save that cannot complete (a full disk, found before it starts or when the
background write fails) is a ``CheckpointSaveError`` naming the directory, the
space needed and the last complete step.  Temporary directories of saves that
never completed (a killed run) are removed when the next run opens the
directory.  A step whose files cannot be read back (damaged or partly deleted)
is a ``CheckpointMismatch`` naming the directory and the step.

In a multi-process run every process opens the ``Checkpointer`` and calls
``save``/``restore`` at the same steps: orbax writes each process's shards
and process 0 the metadata and the data state.  Process 0 alone removes
stale temporaries, and the others wait for it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from research import distributed


class CheckpointMismatch(ValueError):
    """The checkpoint holds a different model than the one being trained."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the message says where, why and what is intact."""


def free_bytes(directory: str) -> int:
    return shutil.disk_usage(directory).free


def _nbytes(tree) -> int:
    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class _QuietOrbaxErrors(logging.Filter):
    """Orbax logs a failed background save as several tracebacks (one per thread) before
    raising it; the raised error is reported once, named, by ``Checkpointer``."""

    def filter(self, record):
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _is_no_space(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _name(path) -> str:
    """A leaf path as ``a/b/0`` whatever the key kinds (dict keys, attributes, indices)."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(p for p in parts if p != "value")


class Checkpointer:
    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True,
                 clean_stale: bool = False):
        """``clean_stale``: this run owns ``directory`` (it trains there), so leftovers of
        incomplete saves are removed; readers of another run's checkpoints leave them."""
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=1, max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )
        self.save_every = save_every
        self._pending = None  # (step, bytes) of the save being written in the background
        self._quiet = None
        if clean_stale:  # this run writes here: its save failures are ours to report
            self._remove_stale_temporaries()
            distributed.barrier("research: stale checkpoint temporaries removed")
            self._quiet = _QuietOrbaxErrors()
            logging.getLogger("absl").addFilter(self._quiet)

    def _remove_stale_temporaries(self, report: bool = True):
        """Saves that never completed leave ``<step>.orbax-checkpoint-tmp*``; no save is
        in flight when a run opens its directory (or after a save failed), so every
        one of them is stale."""
        if not distributed.is_lead():
            return
        for path in sorted(glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*"))):
            shutil.rmtree(path, ignore_errors=True)
            if report:
                print(f"removed {path}: an incomplete checkpoint save of an earlier run")

    def _failed(self, step: int, needed: int, cause: BaseException | None) -> CheckpointSaveError:
        no_space = cause is None or _is_no_space(cause)
        why = "out of disk space" if no_space else f"{type(cause).__name__}: {cause}"
        last = self.latest()
        return CheckpointSaveError(
            errno.ENOSPC if no_space else errno.EIO,
            f"could not save step {step} to {self.directory} ({why}; the checkpoint needs about "
            f"{needed / 2**20:.1f} MiB, {free_bytes(self.directory) / 2**20:.1f} MiB are free). "
            + (f"The last complete checkpoint is step {last}" if last is not None else "No checkpoint is complete yet"),
        )

    def _finish_pending(self):
        """Wait for the background save; its failure is raised here, named."""
        if self._pending is None:
            return
        step, needed = self._pending
        self._pending = None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._remove_stale_temporaries(report=False)
            raise self._failed(step, needed, e) from None

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_state: dict, *, force: bool = False) -> bool:
        if not force and (self.save_every <= 0 or step % self.save_every):
            return False
        if step in (self.manager.all_steps() or []):
            return False
        self._finish_pending()  # the previous save's failure surfaces before anything new is written
        state = {"params": params, "opt_state": opt_state}
        needed = int(_nbytes(state) * 1.05) + (1 << 20)  # the arrays, plus orbax's metadata and the data state
        if free_bytes(self.directory) < needed:
            raise self._failed(step, needed, None)
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            )
        except Exception as e:
            self._remove_stale_temporaries(report=False)
            raise self._failed(step, needed, e) from None
        self._pending = (step, needed)
        return True

    @contextlib.contextmanager
    def _reading(self, step: int):
        """Whatever orbax or tensorstore raise on a step's damaged files, as one
        ``CheckpointMismatch`` line naming the directory and the step."""
        try:
            yield
        except CheckpointMismatch:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CheckpointMismatch(f"{self.directory} step {step} cannot be read back ({type(e).__name__}: {first}); "
                                     "move that step's directory away to use the one before") from None

    def restore(self, step: int, params_target, opt_target):
        """Restore onto the shardings of ``params_target``/``opt_target`` (arrays or ShapeDtypeStructs)."""
        self._check_shapes(step, params_target)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            {"params": params_target, "opt_state": opt_target},
        )
        with self._reading(step):
            out = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
            )
        return out["state"]["params"], out["state"]["opt_state"], out["data"]

    def restore_params(self, step: int, params_target):
        """The parameters alone, onto ``params_target``'s shardings; the optimizer state is not read."""
        self._check_shapes(step, params_target)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), params_target
        )
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)
        state_dir = os.path.join(self.directory, str(step), "state")
        with self._reading(step), ocp.PyTreeCheckpointer() as reader:
            out = reader.restore(state_dir, args=ocp.args.PyTreeRestore(
                item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True))
        return out["params"]

    def param_metadata(self, step: int):
        """The saved parameters' tree of array metadata (shape, dtype) at ``step``."""
        with self._reading(step):
            return self.manager.item_metadata(step)["state"]["params"]

    def param_shapes(self, step: int) -> dict:
        """``{parameter name (``layers/0/attn/q_proj``): shape}`` as saved at ``step``
        (from the metadata alone)."""
        meta = self.param_metadata(step)
        return {_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}

    def _check_shapes(self, step, params_target):
        saved = self.param_shapes(step)
        want = {_name(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params_target)[0]}
        if saved.keys() != want.keys():
            diff = sorted(set(saved) ^ set(want))[:5]
            raise CheckpointMismatch(f"{self.directory} step {step} holds other parameters than this model: {diff}")
        for k in want:
            if saved[k] != want[k]:
                raise CheckpointMismatch(
                    f"{self.directory} step {step}: parameter {k} has shape {saved[k]} there, {want[k]} in this model"
                )

    def wait(self):
        self._finish_pending()

    def close(self):
        """Wait for the save in flight (raising its failure) and release orbax; idempotent."""
        if self.manager is None:
            return
        failed = True
        try:
            self._finish_pending()
            failed = False
        finally:
            manager, self.manager = self.manager, None
            try:
                manager.close()
            except Exception:
                if not failed:  # after a failed save, orbax may raise it again here: it is already reported
                    raise
            finally:
                if self._quiet is not None:
                    logging.getLogger("absl").removeFilter(self._quiet)
