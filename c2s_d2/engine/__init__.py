"""Training reliability: crash-safe checkpoints, exact resume, finite-loss check, CPU multi-process.

See ``ReliableTrainer`` (trainer.py) for what a training run guarantees.
"""

from .checkpoint import C2SCheckpointer, atomic_torch_save, atomic_write, non_finite_tensors
from .determinism import (
    RNGStates,
    capture_rng_state,
    enable_deterministic_mode,
    restore_rng_state,
    rng_isolated,
    seeded_rng,
)
from .hooks import FiniteLossCheck, PeriodicCheckpointHook, non_finite_losses
from .train_loader import (
    PositionSeededDataset,
    ResumableTrainingSampler,
    ResumableTrainLoader,
    build_resumable_train_loader,
)
from .trainer import ReliableTrainer

__all__ = [
    "C2SCheckpointer",
    "FiniteLossCheck",
    "PeriodicCheckpointHook",
    "PositionSeededDataset",
    "RNGStates",
    "ReliableTrainer",
    "ResumableTrainLoader",
    "ResumableTrainingSampler",
    "atomic_torch_save",
    "atomic_write",
    "build_resumable_train_loader",
    "capture_rng_state",
    "enable_deterministic_mode",
    "non_finite_losses",
    "non_finite_tensors",
    "restore_rng_state",
    "rng_isolated",
    "seeded_rng",
]
