"""``ReliableTrainer``: detectron2's DefaultTrainer with crash-safe, exactly resumable training.

Compared with ``DefaultTrainer`` it
* saves with :class:`C2SCheckpointer` (atomic files, no NaN weights, loud loading) and stores the
  RNG states of every process and the data-order seed in each checkpoint;
* restarts a :class:`ResumableTrainLoader` at the resumed iteration;
* runs evaluation without moving the training RNG streams;
* stops on a non-finite loss (``SOLVER.CHECK_FINITE_LOSS``) or matching cost with a message
  naming the term and the iteration, on every process at once (one small all-reduce per step);
* wraps CPU models in DistributedDataParallel without ``device_ids`` (detectron2 passes the
  local rank, which DDP refuses for CPU modules), so ``--num-gpus N`` runs on CPU with gloo.

DDP is built without ``find_unused_parameters``: every parameter of a C2S model gets a gradient
in every training step, whatever the config and the data (parts a config does not train, such as
CLS queries without global distillation, are not built; tests/test_multiprocess.py checks each
switch). A subclass whose model has data-dependent unused parameters overrides
:meth:`ReliableTrainer.ddp_kwargs`.
"""

from __future__ import annotations

import logging
import weakref
from typing import Dict, List

from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn

from ..utils.errors import is_user_error, one_line_error
from .checkpoint import C2SCheckpointer
from .determinism import RNGStates, rng_isolated
from .hooks import FiniteLossCheck, PeriodicCheckpointHook
from .train_loader import ResumableTrainLoader

__all__ = ["ReliableTrainer"]


class _NoTracebackForUserErrors(logging.Filter):
    """detectron2 logs "Exception during training:" with the traceback; for input errors and
    numerical faults the command ends with one line, so the log keeps that line only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            if is_user_error(error):
                record.msg = f"{record.getMessage()} {one_line_error(error)}"
                record.args, record.exc_info, record.exc_text = None, None, None
        return True


def _refuse_gpu_only_norms(model: nn.Module) -> None:
    """PyTorch's SyncBatchNorm needs GPUs; say which setting to change instead of failing in DDP."""
    if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        raise ValueError(
            "norm 'SyncBN' (torch.nn.SyncBatchNorm) runs on GPUs only: with several CPU processes "
            "use 'naiveSyncBN' or 'BN' (MODEL.RESNETS.NORM, MODEL.C2S.PIXEL_DECODER.NORM)"
        )


def _quiet_training_loop_tracebacks() -> None:
    train_loop_logger = logging.getLogger("detectron2.engine.train_loop")
    if not any(isinstance(f, _NoTracebackForUserErrors) for f in train_loop_logger.filters):
        train_loop_logger.addFilter(_NoTracebackForUserErrors())


class ReliableTrainer(DefaultTrainer):
    """DefaultTrainer with the guarantees listed in the module docstring.

    Subclasses provide ``build_train_loader`` (ideally :func:`build_resumable_train_loader`; any
    other loader trains, without exact resume), the model, optimiser and evaluators, as usual.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__ is not called: it wraps CPU models in DDP with device_ids.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        _quiet_training_loop_tracebacks()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        distiller = getattr(model, "distiller", None)
        if hasattr(distiller, "prepare"):  # teacher and latent vocabulary now, not in step 1
            distiller.prepare(cfg.MODEL.DEVICE)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        if on_cpu and comm.get_world_size() > 1:
            _refuse_gpu_only_norms(model)
        ddp_args = {"device_ids": None} if on_cpu else {}
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_args, **self.ddp_kwargs(cfg))
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.rng_states = RNGStates()
        extra = {"data_order": data_loader} if isinstance(data_loader, ResumableTrainLoader) else {}
        self.checkpointer = C2SCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self), rng=self.rng_states, **extra
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def ddp_kwargs(cls, cfg) -> Dict:
        """Extra DistributedDataParallel arguments. None: every parameter gets a gradient in every
        step (``find_unused_parameters`` would only add a graph traversal per step)."""
        return {}

    def build_hooks(self) -> List[hooks.HookBase]:
        """DefaultTrainer's hooks, with our checkpoint and evaluation hooks and the loss check."""
        cfg = self.cfg
        replaced = (hooks.PeriodicCheckpointer, hooks.EvalHook)
        ret = [h for h in super().build_hooks() if not isinstance(h, replaced)]
        # always installed: the matching cost is checked even when the losses are not
        ours: List[hooks.HookBase] = [FiniteLossCheck(check_losses=cfg.SOLVER.CHECK_FINITE_LOSS)]
        ours.append(
            PeriodicCheckpointHook(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, self.rng_states)
        )
        # after the checkpoint: if evaluation fails, the checkpoint is there to debug it
        ours.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, self._evaluate_without_rng_side_effects))
        # writers stay last so that they write the evaluation results
        at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)), len(ret))
        return ret[:at] + ours + ret[at:]

    def _evaluate_without_rng_side_effects(self) -> Dict:
        # a resumed run does not repeat the evaluations of the first run: they must not draw
        with rng_isolated():
            self._last_eval_results = self.test(self.cfg, self.model)
        return self._last_eval_results

    def resume_or_load(self, resume: bool = True) -> None:
        """DefaultTrainer's, then the training loader restarts at ``start_iter``."""
        super().resume_or_load(resume=resume)
        loader = self._trainer.data_loader
        if isinstance(loader, ResumableTrainLoader):
            loader.start_at(self.start_iter)
