"""Random-number state for exact resume: deterministic mode, checkpointed RNG states, isolation.

A resumed run reproduces an uninterrupted one bit for bit when every random draw of training
happens at the same place in the same stream:

* the training RNG streams (torch, CUDA, numpy, python ``random``) of every process are saved
  in each checkpoint (:class:`RNGStates`) and restored on resume;
* evaluation runs inside :func:`rng_isolated`, so evaluating (or not, after a resume) never moves
  those streams;
* data augmentation draws from a stream seeded by (seed, sample position) (:func:`seeded_rng`),
  so it depends neither on the number of loader workers nor on where a run was resumed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
from detectron2.utils import comm

__all__ = [
    "RNGStates",
    "capture_rng_state",
    "enable_deterministic_mode",
    "restore_rng_state",
    "rng_isolated",
    "seeded_rng",
]

logger = logging.getLogger(__name__)


def enable_deterministic_mode() -> None:
    """Deterministic kernels where PyTorch has them (others warn), no cuDNN autotuning."""
    # cuBLAS needs a fixed workspace for deterministic matrix products on CUDA >= 10.2
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    logger.info("deterministic mode: torch.use_deterministic_algorithms(True, warn_only=True)")


def capture_rng_state() -> Dict[str, Any]:
    """This process's RNG states, as tensors and numbers (loadable with ``weights_only``)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def rng_isolated() -> Iterator[None]:
    """Run a block without moving this process's RNG streams (they are restored on exit)."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


@contextlib.contextmanager
def seeded_rng(*key: int) -> Iterator[None]:
    """Run a block with torch / numpy / python RNGs seeded from ``key``, then restore them."""
    words = np.random.SeedSequence([int(k) for k in key]).generate_state(3, dtype=np.uint32)
    with rng_isolated():
        torch.manual_seed(int(words[0]) << 32 | int(words[1]))
        np.random.seed(int(words[1]))
        random.seed(int(words[2]))
        yield


class RNGStates:
    """Checkpointable RNG states of every process.

    :meth:`gather` (a collective: every process calls it) collects the states just before a
    checkpoint is written by the main process; :meth:`load_state_dict` gives each process its own.
    """

    def __init__(self) -> None:
        self._gathered: Optional[List[Dict[str, Any]]] = None

    def gather(self) -> None:
        states = [capture_rng_state()]
        self._gathered = comm.all_gather(states[0]) if comm.get_world_size() > 1 else states

    def state_dict(self) -> Dict[str, Any]:
        per_process = self._gathered or [capture_rng_state()]
        self._gathered = None
        return {"per_process": per_process}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        per_process = state["per_process"]
        rank, world = comm.get_rank(), comm.get_world_size()
        if len(per_process) != world:
            logger.warning(
                f"the checkpoint holds RNG states of {len(per_process)} processes, this run has "
                f"{world}: the resumed run cannot reproduce an uninterrupted one exactly"
            )
        if rank < len(per_process):
            restore_rng_state(per_process[rank])
