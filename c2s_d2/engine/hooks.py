"""Training hooks: stop every process on a non-finite loss or matching cost before the update;
checkpoints with RNG states."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..utils.errors import NonFiniteError
from .determinism import RNGStates

__all__ = [
    "FiniteLossCheck",
    "PeriodicCheckpointHook",
    "non_finite_losses",
    "non_finite_stop_message",
]

logger = logging.getLogger(__name__)

# (non-finite loss terms as "loss_dice is nan", matching-cost faults) of one process in one step
StepFaults = Tuple[List[str], List[str]]


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


def non_finite_stop_message(
    iteration: int, faults: Sequence[StepFaults], last_checkpoint: str
) -> str:
    """The one-line reason to stop training, the same on every process.

    Args:
        iteration: the failed iteration.
        faults: per process (index = rank), its non-finite loss terms and matching-cost faults;
            a single entry for single-process training (no process is named then).
        last_checkpoint: path of the last checkpoint, or "none".

    A matching-cost fault is named alone: the losses of that step come from the same non-finite
    predictions. Of several matching-cost faults the first is named and the others counted.
    """
    multi = len(faults) > 1
    matching = [
        f"process {rank}, {fault}" if multi else fault
        for rank, (_, costs) in enumerate(faults)
        for fault in dict.fromkeys(costs)  # deep supervision repeats a fault once per layer
    ]
    if matching:
        more = f"; {len(matching) - 1} more" if len(matching) > 1 else ""
        reason = f"non-finite matching cost at iteration {iteration} ({matching[0]}{more})"
    else:
        terms = [
            f"{term} in process {rank}" if multi else term
            for rank, (bad_losses, _) in enumerate(faults)
            for term in bad_losses
        ]
        reason = f"{', '.join(terms)} at iteration {iteration}"
    return (
        f"{reason}; training stopped before the weight update (last checkpoint: {last_checkpoint})"
    )


class FiniteLossCheck(HookBase):
    """Raise :class:`NonFiniteError` on every process, naming the loss terms (or the matching
    cost) and the iteration, as soon as one process's step has a non-finite loss (or matching
    cost): before the backward pass, so no weight is updated with it.

    Installed as a forward hook of the model (the loss dict is the training forward's output). With
    several processes, each step all-reduces one 2-element flag (bad loss, bad matching cost), so
    all processes raise together, with the same message, and none is left waiting in the next
    collective. Sub-modules with a ``defer_non_finite`` attribute (the matchers, see
    c2s_d2/modeling/matcher.py) defer their non-finite errors to this check, listing them in
    ``non_finite_reports``: raised inside the forward, on one process only, such an error would
    leave the others blocked in the forward's own collectives.
    """

    def __init__(self, check_losses: bool = True):
        """
        Args:
            check_losses: also stop on non-finite losses (``SOLVER.CHECK_FINITE_LOSS``); the
                matching cost is always checked (a NaN assignment cannot be solved).
        """
        self.check_losses = check_losses

    def before_train(self) -> None:
        model = self.trainer.model
        core = model.module if isinstance(model, DistributedDataParallel) else model
        # HungarianMatcher and any other module that can defer its non-finite errors
        self._matchers = [m for m in core.modules() if hasattr(m, "defer_non_finite")]
        for m in self._matchers:
            m.defer_non_finite = True
            m.non_finite_reports = []
        self._handle = core.register_forward_hook(self._check)

    def after_train(self) -> None:
        self._handle.remove()
        for m in self._matchers:
            m.defer_non_finite = False

    def _step_faults(self, output: Dict[str, Any]) -> StepFaults:
        costs = [r for m in self._matchers for r in m.non_finite_reports]
        for m in self._matchers:
            m.non_finite_reports = []
        return (non_finite_losses(output) if self.check_losses else []), costs

    def _check(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not module.training or not isinstance(output, dict):
            return
        faults = self._step_faults(output)
        if comm.get_world_size() > 1:
            if not _any_process(bool(faults[0]), bool(faults[1]), output):
                return
            # rare path: every process learns what failed where (and the main one's checkpoint)
            gathered = comm.all_gather((faults, self._last_checkpoint()))
            all_faults = [f for f, _ in gathered]
            last = gathered[0][1]
        elif not (faults[0] or faults[1]):
            return
        else:
            all_faults, last = [faults], self._last_checkpoint()
        raise NonFiniteError(non_finite_stop_message(self.trainer.iter, all_faults, last))

    def _last_checkpoint(self) -> str:
        checkpointer = getattr(self.trainer, "checkpointer", None)
        if checkpointer is not None and checkpointer.has_checkpoint():
            return checkpointer.get_checkpoint_file()
        return "none"


def _any_process(bad_loss: bool, bad_cost: bool, output: Dict[str, Any]) -> bool:
    """True on every process when one process has a fault: one all-reduce of 2 numbers."""
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
        device = next((v.device for v in output.values() if torch.is_tensor(v)), None)
        if device is None or device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    flags = torch.tensor([float(bad_loss), float(bad_cost)], device=device)
    dist.all_reduce(flags)
    return bool(flags.any())


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
