"""Training hooks: stop on a non-finite loss before the update; checkpoints with RNG states."""

from __future__ import annotations

import logging
from typing import Any, Dict, List

import torch
from detectron2.engine import HookBase
from torch.nn.parallel import DistributedDataParallel

from ..utils.errors import NonFiniteError
from .determinism import RNGStates

__all__ = ["FiniteLossCheck", "PeriodicCheckpointHook", "non_finite_losses"]

logger = logging.getLogger(__name__)


def non_finite_losses(losses: Dict[str, Any]) -> List[str]:
    """``["loss_dice is nan", ...]`` for the loss terms (tensors) that are not finite."""
    names = [k for k, v in losses.items() if torch.is_tensor(v)]
    if not names:
        return []
    values = torch.stack([losses[k].detach().float().sum() for k in names])
    finite = torch.isfinite(values)
    if bool(finite.all()):  # the common case: one check, one device-to-host copy
        return []
    out = []
    for k, v, ok in zip(names, values.tolist(), finite.tolist()):
        if not ok:
            out.append(f"{k} is {'nan' if v != v else ('inf' if v > 0 else '-inf')}")
    return out


class FiniteLossCheck(HookBase):
    """Raise :class:`NonFiniteError` naming the loss terms and the iteration as soon as the model
    returns a non-finite loss: before the backward pass, so no weight is updated with it.

    Installed as a forward hook of the model (the loss dict is the training forward's output).
    """

    def before_train(self) -> None:
        model = self.trainer.model
        core = model.module if isinstance(model, DistributedDataParallel) else model
        self._handle = core.register_forward_hook(self._check)

    def after_train(self) -> None:
        self._handle.remove()

    def _check(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not module.training or not isinstance(output, dict):
            return
        bad = non_finite_losses(output)
        if not bad:
            return
        checkpointer = getattr(self.trainer, "checkpointer", None)
        last = "none"
        if checkpointer is not None and checkpointer.has_checkpoint():
            last = checkpointer.get_checkpoint_file()
        raise NonFiniteError(
            f"{', '.join(bad)} at iteration {self.trainer.iter}; training stopped before the "
            f"weight update (last checkpoint: {last})"
        )


class PeriodicCheckpointHook(HookBase):
    """Save ``model_<iter>.pth`` every ``period`` iterations and ``model_final.pth`` at the end.

    Runs on every process: the RNG states of all processes are gathered (a collective) before the
    main process writes the checkpoint.
    """

    def __init__(self, checkpointer, period: int, rng_states: RNGStates):
        """
        Args:
            checkpointer: a checkpointer that saves on the main process only.
            period: ``SOLVER.CHECKPOINT_PERIOD`` (<= 0: only the final checkpoint).
            rng_states: the checkpointer's RNG-state checkpointable.
        """
        self.checkpointer = checkpointer
        self.period = int(period)
        self.rng_states = rng_states

    def after_step(self) -> None:
        it = self.trainer.iter
        periodic = self.period > 0 and (it + 1) % self.period == 0
        final = it >= self.trainer.max_iter - 1
        if not (periodic or final):
            return
        self.rng_states.gather()
        if periodic:
            self.checkpointer.save(f"model_{it:07d}", iteration=it)
        if final:
            if periodic:
                self.rng_states.gather()
            self.checkpointer.save("model_final", iteration=it)
