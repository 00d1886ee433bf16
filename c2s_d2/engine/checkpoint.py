"""Crash-safe checkpoints and loud loading.

Saving: the checkpoint is written to a temporary file in the same folder, flushed to disk and
renamed over the final name (``os.replace`` is atomic on POSIX and Windows); only then is the
``last_checkpoint`` tag rewritten, the same way. A process killed at any moment therefore leaves
either the previous files or the new ones, never a truncated ``model_final.pth`` nor a tag naming
a broken file. Weights that are not finite are never written (:class:`NonFiniteError`).

Loading (our decision, unlike detectron2 which skips such tensors with a warning): a tensor whose
shape differs between checkpoint and model is an error listing every such key, and so is a
checkpoint that shares no parameter name with the model (another architecture). Missing keys are
an error with ``require_all_keys`` (evaluation: a half-filled model must not be scored) and a
warning otherwise (fine-tuning from a backbone-only file is normal). A missing, truncated or
unreadable file is an error naming it.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..utils.errors import NonFiniteError

__all__ = ["C2SCheckpointer", "atomic_write", "atomic_torch_save", "non_finite_tensors"]

logger = logging.getLogger(__name__)

TAG_FILE = "last_checkpoint"


def atomic_write(path: str, write_fn: Callable[[Any], None], binary: bool = True) -> None:
    """Call ``write_fn(file)`` on a temporary file next to ``path``, then rename it to ``path``.

    The temporary name is ``.<name>.tmp`` (a leftover of a killed writer is simply overwritten).
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points to it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable (not possible on every platform / file system)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file under ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def non_finite_tensors(state: Mapping[str, Any]) -> List[str]:
    """Names of the floating-point tensors of ``state`` holding a NaN or an infinity."""
    return [
        k
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def _short_list(items: Iterable[str], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


class C2SCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves and strict, clearly reported loading."""

    def __init__(
        self,
        model: torch.nn.Module,
        save_dir: str = "",
        *,
        require_all_keys: bool = False,
        save_to_disk: Optional[bool] = None,
        **checkpointables: Any,
    ):
        """
        Args:
            model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
            require_all_keys: loading a file that leaves model parameters or buffers unfilled
                is an error (use it for evaluation).
        """
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.require_all_keys = require_all_keys
        self._loading = ""

    # ------------------------------------------------------------------ saving
    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` atomically, then tag it as the last checkpoint."""
        if not self.save_dir or not self.save_to_disk:
            return
        if "://" in self.save_dir:  # remote storage: no atomic rename available
            return super().save(name, **kwargs)
        data: Dict[str, Any] = {"model": self.model.state_dict()}
        bad = non_finite_tensors(data["model"])
        if bad:
            when = f" at iteration {kwargs['iteration']}" if "iteration" in kwargs else ""
            last = self.get_checkpoint_file() if self.has_checkpoint() else "none"
            raise NonFiniteError(
                f"weights {_short_list(bad)} are not finite{when}; {name}.pth was not written "
                f"(last checkpoint: {last})"
            )
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        atomic_torch_save(data, path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, TAG_FILE)
        atomic_write(path, lambda f: f.write(last_filename_basename), binary=False)

    # ------------------------------------------------------------------ loading
    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            if "://" not in last and not os.path.isfile(last):
                tag = os.path.join(self.save_dir, TAG_FILE)
                raise FileNotFoundError(
                    f"{tag} names {last}, which does not exist (fix or delete {tag} to resume "
                    "from another checkpoint)"
                )
        return super().resume_or_load(path, resume=resume)

    def load(self, path: str, *args, **kwargs) -> Dict[str, Any]:
        if path:
            local = urlparse(path)._replace(query="").geturl()
            if "://" not in local and not os.path.isfile(local):
                raise FileNotFoundError(f"checkpoint file not found: {local}")
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = ""

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            return super()._load_file(filename)
        except Exception as e:  # torch.load / pickle raise many types for a bad file
            reason = " ".join(str(e).split()).split(". ")[0][:200]  # its first sentence
            raise ValueError(
                f"cannot read checkpoint {filename} (truncated, corrupt or not a checkpoint "
                f"file): {type(e).__name__}: {reason}"
            ) from e

    def _load_model(self, checkpoint: Any):
        loaded_keys = set(checkpoint.get("model", {}).keys())
        incompatible = super()._load_model(checkpoint)
        where = self._loading or "checkpoint"
        if incompatible.incorrect_shapes:
            shapes = [
                f"{k} {tuple(c)} in the file vs {tuple(m)} in the model"
                for k, c, m in incompatible.incorrect_shapes
            ]
            raise ValueError(
                f"checkpoint {where} does not fit the model (another architecture or config?): "
                f"{len(shapes)} tensors have other shapes: {_short_list(shapes, 6)}"
            )
        model_keys = list(self.model.state_dict().keys())
        if loaded_keys and model_keys and len(incompatible.missing_keys) == len(model_keys):
            raise ValueError(
                f"checkpoint {where} shares no parameter name with the model (another "
                f"architecture?): file keys {_short_list(sorted(loaded_keys), 4)}; model keys "
                f"{_short_list(model_keys, 4)}"
            )
        if self.require_all_keys and incompatible.missing_keys:
            raise ValueError(
                f"checkpoint {where} leaves {len(incompatible.missing_keys)} model tensors "
                f"unfilled (another architecture or config?): "
                f"{_short_list(incompatible.missing_keys)}"
            )
        return incompatible
