"""orbax checkpoints of (params, optimizer state, data iterator state).

Saved every ``save_every`` steps, the last ``keep`` kept, written
asynchronously; orbax writes each step to a temporary directory and renames
it when complete, so an interrupted save never replaces a good checkpoint.
Restoring takes the *current* shardings as the target, so a run saved on one
mesh resumes on another (orbax reshards).
"""

from __future__ import annotations

import errno
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
    """The checkpoint holds a different model than the one being trained."""


def _name(path) -> str:
    """A leaf path as ``a/b/0`` whatever the key kinds (dict keys, attributes, indices)."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(p for p in parts if p != "value")


class Checkpointer:
    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=1, max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )
        self.save_every = save_every

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_state: dict, *, force: bool = False) -> bool:
        if not force and (self.save_every <= 0 or step % self.save_every):
            return False
        if step in (self.manager.all_steps() or []):
            return False
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                    data=ocp.args.JsonSave(data_state),
                ),
            )
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OSError(
                    errno.ENOSPC,
                    f"out of disk space while saving step {step} to {self.directory}; "
                    f"the last complete checkpoint (step {self.latest()}) is intact",
                ) from e
            raise
        return True

    def restore(self, step: int, params_target, opt_target):
        """Restore onto the shardings of ``params_target``/``opt_target`` (arrays or ShapeDtypeStructs)."""
        self._check_shapes(step, params_target)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            {"params": params_target, "opt_state": opt_target},
        )
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
        )
        return out["state"]["params"], out["state"]["opt_state"], out["data"]

    def restore_params(self, step: int, params_target):
        self._check_shapes(step, params_target)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), params_target
        )
        meta = self.manager.item_metadata(step)["state"]
        opt_abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta["opt_state"])
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore({"params": abstract, "opt_state": opt_abstract}),
                data=ocp.args.JsonRestore(),
            ),
        )
        return out["state"]["params"]

    def _check_shapes(self, step, params_target):
        meta = self.manager.item_metadata(step)["state"]["params"]
        saved = {_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}
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
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
