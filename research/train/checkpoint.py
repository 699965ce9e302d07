"""Orbax checkpoints of a run: the training state plus a JSON record of everything needed to continue it.

Layout: `<run dir>/checkpoints/<step>/{state, meta}`. `state` is {"step", "params", "opt_state"}; `meta` holds the
run config, the model config, the tokenizer spec and the data position (the sampler's seed and next step). Restoring
uses an abstract target so optax state objects come back as they were, with the shardings of the current mesh.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from research import errors, tree


def exists(workdir: Path) -> bool:
    """Whether `workdir` holds at least one finished checkpoint (without starting a CheckpointManager)."""
    ckpt_dir = Path(workdir) / "checkpoints"
    return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


class Checkpoints:
    """A thin wrapper over `ocp.CheckpointManager` for one run directory."""

    def __init__(self, workdir: Path, keep: int = 2, create: bool = True):
        self.dir = Path(workdir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._mgr = ocp.CheckpointManager(self.dir, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def delete(self, step: int) -> None:
        self._mgr.delete(step)

    def save(self, step: int, state, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._mgr.save(step, args=args, force=True)

    def meta(self, step: int | None = None) -> dict:
        step = self.resolve(step)
        return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, target, step: int | None = None):
        """Restores (state, meta) at `step` (default latest) into the structure and shardings of `target`.

        Args:
          target: a state tree of arrays or ShapeDtypeStructs (with .sharding) giving structure and placement.
        """
        step = self.resolve(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        self._check_shapes(step, abstract)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        out = self._mgr.restore(step, args=args)
        return out.state, out.meta

    def _check_shapes(self, step: int, abstract) -> None:
        """Compares the stored arrays' shapes with the target's, naming the first tensor that disagrees."""
        stored = {k: tuple(v.shape) for k, v in tree.flatten(self._mgr.item_metadata(step)["state"]).items()}
        wanted = {k: tuple(v.shape) for k, v in tree.flatten(abstract).items()}
        where = f"checkpoint {self.dir / str(step)} was written by an incompatible config"
        for k in wanted:
            if k not in stored:
                raise errors.UserError(f"{where}: it has no tensor {k}")
            if stored[k] != wanted[k]:
                raise errors.UserError(f"{where}: {k} has shape {stored[k]} there, but the config gives {wanted[k]}")
        extra = sorted(set(stored) - set(wanted))
        if extra:
            raise errors.UserError(f"{where}: it has tensors this model lacks ({', '.join(extra[:3])})")

    def resolve(self, step: int | None) -> int:
        """`step` if it was saved, else the latest step for None; a UserError when there is none."""
        steps = self.all_steps()
        if not steps:
            raise errors.UserError(f"no checkpoint in {self.dir}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise errors.UserError(f"no checkpoint for step {step} in {self.dir}; available steps: {steps}")
        return step

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()


def load_run(workdir: str | Path, step: int | None = None):
    """Loads a trained model from a run directory.

    Args:
      workdir: a run directory written by `ziplm train`.
      step: checkpoint step (default: the latest).

    Returns:
      (config, graphdef, params, meta): the run's ConfigDict, the model graphdef, its parameters, the
      checkpoint's meta record (which includes the step under "step").
    """
    from research import config as config_lib
    from research import models
    from research.train import optim
    from research.train import step as step_lib

    workdir = Path(workdir).expanduser()
    if not (workdir / "checkpoints").is_dir():
        raise errors.UserError(f"{workdir} is not a run directory (no checkpoints/ inside)")
    ckpts = Checkpoints(workdir, create=False)
    step = ckpts.resolve(step)
    meta = ckpts.meta(step)
    cfg = config_lib.from_dict(meta["config"])
    graphdef, abstract_params = models.abstract(config_lib.model_cfg(cfg))
    tx = optim.make(cfg.train)
    abstract_state = step_lib.abstract_state(abstract_params, tx)
    # Restore onto this process's first device, whatever mesh wrote the checkpoint.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_state)
    state, meta = ckpts.restore(target, step)
    ckpts.close()
    return cfg, graphdef, state["params"], {**meta, "step": step}
