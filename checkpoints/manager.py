"""Orbax checkpoints of a run: parameters, the rest of the train state, and each host's data-iterator position.

Parameters are their own item so evaluation, samplers and export restore them alone. Restoring takes abstract
arrays that carry the target shardings, so a checkpoint written on a pod restores onto one CPU or GPU.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp

from errors import InputError


def _shapes_by_path(tree) -> dict[str, tuple]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape) for path, leaf in flat}


class Checkpoints:
    def __init__(self, workdir: str, keep: int = 3):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers={"params": ocp.StandardCheckpointHandler(),
                           "train_state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: dict, data_iterator) -> None:
        """Saves asynchronously; the step directory appears only once every host has finished writing it."""
        step = int(jax.device_get(state["step"]))
        self._manager.save(step, force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            train_state=ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]}),
            data=grain.checkpoint.CheckpointSave(data_iterator)))

    def restore(self, step: int, abstract_state: dict, data_iterator) -> dict:
        """The train state at `step`, placed by the shardings in `abstract_state`; moves `data_iterator` too."""
        self.check_compatible(step, abstract_state["params"])
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            train_state=ocp.args.StandardRestore({"step": abstract_state["step"],
                                                  "opt_state": abstract_state["opt_state"]}),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return {"params": restored["params"], **restored["train_state"]}

    def restore_params(self, abstract_params, step: int | None = None):
        """Only the parameters, of the latest checkpoint unless `step` is given."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise InputError(f"no checkpoint in {self.directory}; train first (python train.py ... --workdir=...)")
        self.check_compatible(step, abstract_params)
        return self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))["params"]

    def parameter_shapes(self, step: int) -> dict[str, tuple]:
        """The saved parameters' '/'-joined names and shapes at `step`, read from the metadata alone."""
        return _shapes_by_path(self._manager.item_metadata(step)["params"])

    def check_compatible(self, step: int, abstract_params) -> None:
        """Compares parameter names and shapes before reading any array, so a mismatch is one clear line."""
        saved = self.parameter_shapes(step)
        wanted = _shapes_by_path(abstract_params)
        where = f"checkpoint {self.directory}/{step}"
        for name in sorted(set(saved) | set(wanted)):
            if name not in saved:
                raise InputError(f"{where} does not match config.model: it has no parameter {name}")
            if name not in wanted:
                raise InputError(f"{where} does not match config.model: its parameter {name} is not in the model")
            if saved[name] != wanted[name]:
                raise InputError(f"{where} does not match config.model: {name} has shape {saved[name]} in the "
                                 f"checkpoint, {wanted[name]} in the model")

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
