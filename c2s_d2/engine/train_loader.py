"""A training data loader whose data order is a function of (seed, iteration).

detectron2's ``TrainingSampler`` restarts its random stream when a run is resumed, so a resumed
run sees other images than an uninterrupted one. Here:

* the sample stream is ``perm_0 + perm_1 + ...`` where ``perm_e`` is a permutation of the
  dataset drawn from (seed, e); the sample at global position ``p`` is therefore known without
  replaying the stream, and a run resumed at iteration ``i`` starts at ``p = i * IMS_PER_BATCH``;
* process ``r`` of ``W`` takes positions ``p = r, r + W, ...`` (as detectron2 does), and each of
  its DataLoader workers takes whole batches, round robin: batch ``k`` of a process always holds
  the same positions, whatever ``DATALOADER.NUM_WORKERS``;
* the augmentation of the sample at position ``p`` draws from RNGs seeded by (seed, p).

Aspect-ratio grouping is not used (it would carry images from one batch to the next); semantic
segmentation crops to a fixed size anyway. The seed is saved in checkpoints (``data_order``), so
a run started with a random seed (``SEED < 0``) resumes in the same order.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from detectron2.data import DatasetFromList, get_detection_dataset_dicts
from detectron2.data.build import build_batch_data_loader
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler

from .determinism import seeded_rng

__all__ = [
    "PositionSeededDataset",
    "ResumableTrainLoader",
    "ResumableTrainingSampler",
    "build_resumable_train_loader",
]

logger = logging.getLogger(__name__)

SampleKey = Tuple[int, int, int]  # (seed, global position, dataset index)


class ResumableTrainingSampler(Sampler):
    """Infinite stream of ``(seed, position, index)`` keys for this process, from
    ``start_position`` on (see the module docstring)."""

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ):
        """
        Args:
            size: number of dataset records (> 0).
            seed: seed of the permutations and of the per-sample augmentation RNGs.
            shuffle: permute each epoch (else ``0..size-1`` every epoch).
            rank, world_size: this process and the number of processes (default: detectron2's).
        """
        super().__init__()
        if size <= 0:
            raise ValueError(f"the training set is empty (size {size})")
        self.size = int(size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size
        self.start_position = 0

    def permutation(self, epoch: int) -> List[int]:
        """Dataset indices of epoch ``epoch``, a function of (seed, epoch) only."""
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[SampleKey]:
        position = self.start_position + self.rank
        epoch, order = -1, []
        while True:
            e, j = divmod(position, self.size)
            if e != epoch:
                epoch, order = e, self.permutation(e)
            yield (self.seed, position, order[j])
            position += self.world_size


class PositionSeededDataset(Dataset):
    """Map-style dataset over records, indexed by :data:`SampleKey`: the mapper runs with RNGs
    seeded by (seed, position), so a sample's augmentation is the same in every run."""

    def __init__(self, records: List[Dict], mapper: Callable[[Dict], Any]):
        # serialised once (detectron2's DatasetFromList): workers share it without copying
        self._records = DatasetFromList(records, copy=False, serialize=True)
        self._mapper = mapper

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, key: SampleKey) -> Any:
        seed, position, index = key
        record = self._records[index]
        with seeded_rng(seed, position):
            out = self._mapper(record)
        if out is None:
            # detectron2 would silently draw another image; that would break the data order
            raise ValueError(f"the training mapper returned None for {record.get('file_name')}")
        return out


class ResumableTrainLoader:
    """Batches of mapped samples (lists of ``IMS_PER_BATCH / world_size`` dicts), in an order
    fixed by (seed, iteration). Call :meth:`start_at` before iterating to resume."""

    def __init__(
        self,
        records: List[Dict],
        mapper: Callable[[Dict], Any],
        *,
        total_batch_size: int,
        num_workers: int,
        seed: int,
        shuffle: bool = True,
    ):
        """
        Args:
            records: dataset dicts (detectron2 format).
            mapper: the training mapper (record -> model input dict).
            total_batch_size: images per iteration over all processes.
            num_workers: DataLoader worker processes per training process.
            seed: data-order seed (see :class:`ResumableTrainingSampler`).
            shuffle: permute each epoch.
        """
        world = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world != 0:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH={total_batch_size} must be a positive multiple of the "
                f"number of processes ({world})"
            )
        self.total_batch_size = total_batch_size
        self.sampler = ResumableTrainingSampler(len(records), seed, shuffle)
        self._loader = build_batch_data_loader(
            PositionSeededDataset(records, mapper),
            self.sampler,
            total_batch_size,
            aspect_ratio_grouping=False,
            num_workers=num_workers,
            # the loader's own generator: creating an iterator never draws from the global RNG
            seed=seed,
        )

    def start_at(self, iteration: int) -> None:
        """The next iterator yields the batch of ``iteration`` first."""
        self.sampler.start_position = int(iteration) * self.total_batch_size

    def __iter__(self) -> Iterator[List[Dict]]:
        return iter(self._loader)

    def state_dict(self) -> Dict[str, int]:
        return {"seed": self.sampler.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if int(state["seed"]) != self.sampler.seed:
            logger.info(f"data order: seed {state['seed']} of the checkpoint is used")
        self.sampler.seed = int(state["seed"])


def strict_inductive_records(records: List[Dict], train_names) -> List[Dict]:
    """The strict inductive setting: drop every training image holding an unseen pixel."""
    from detectron2.data import MetadataCatalog

    from ..data.zero_shot import drop_images_with_unseen_pixels, unseen_dataset_ids

    unseen = set()
    for name in train_names:
        meta = MetadataCatalog.get(name)
        if meta.get("label_lut", None) is None:
            raise ValueError(
                f"DATASETS.ZERO_SHOT_SETTING 'inductive_strict': training dataset {name} has no "
                "label_lut (not registered as a zero-shot training split)"
            )
        unseen |= set(unseen_dataset_ids(meta.label_lut, meta.num_dataset_classes))
    kept = drop_images_with_unseen_pixels(records, sorted(unseen))
    logger.info(
        f"inductive_strict: {len(records) - len(kept)} of {len(records)} training images hold "
        f"an unseen pixel and are dropped; {len(kept)} kept"
    )
    if not kept:
        raise ValueError(
            f"DATASETS.ZERO_SHOT_SETTING 'inductive_strict': every image of {list(train_names)} "
            "holds an unseen pixel; nothing is left to train on"
        )
    return kept


def build_resumable_train_loader(cfg, mapper: Callable[[Dict], Any]) -> ResumableTrainLoader:
    """:class:`ResumableTrainLoader` over ``cfg.DATASETS.TRAIN`` (seed: ``cfg.SEED``, or a
    random seed shared by all processes when it is negative)."""
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN!r}: c2s-d2 trains with "
            "'TrainingSampler' (an exactly resumable order)"
        )
    records = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    )
    if cfg.DATASETS.ZERO_SHOT_SETTING == "inductive_strict":
        records = strict_inductive_records(records, cfg.DATASETS.TRAIN)
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    return ResumableTrainLoader(
        records,
        mapper,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        seed=seed,
    )
