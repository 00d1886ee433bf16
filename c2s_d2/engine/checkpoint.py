"""Crash-safe checkpoints, loud loading, and one run per output folder.

Saving: the checkpoint is written to a temporary file in the same folder (a name of its own per
process), flushed to disk and renamed over the final name (``os.replace`` is atomic on POSIX and
Windows); only then is the ``last_checkpoint`` tag rewritten, the same way. A process killed at any
moment, or a full disk (:class:`DiskFullError`), therefore leaves either the previous files or the
new ones, never a truncated ``model_final.pth`` nor a tag naming a broken file. Weights that are
not finite are never written (:class:`NonFiniteError`).

Loading (our decision, unlike detectron2 which skips such tensors with a warning): a tensor whose
shape differs between checkpoint and model is an error listing every such key, and so is a
checkpoint that shares no parameter name with the model (another architecture). Missing keys are
an error with ``require_all_keys`` (evaluation: a half-filled model must not be scored) and a
warning otherwise (fine-tuning from a backbone-only file is normal). A missing, truncated or
unreadable file is an error naming it, and so are a CLIP checkpoint (it belongs in
``MODEL.CLIP.PRETRAINED``) and a ``last_checkpoint`` tag that does not hold a file name. A URL
(``detectron2://...``, ``https://...``) that cannot be downloaded (an offline machine) is a
``FileNotFoundError`` naming the URL and saying what to do instead (:func:`fetch_weights`).

One run per folder: :class:`OutputDirLock` takes an exclusive ``flock`` on
``<OUTPUT_DIR>/.c2s.lock`` for the whole run, so a second run into the same folder is refused
before it writes anything there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import http.client
import logging
import os
import re
import secrets
import zipfile
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import Detectron2Handler, PathManager

from ..utils.errors import DiskFullError, NonFiniteError, OutputDirInUseError

__all__ = [
    "C2SCheckpointer",
    "OutputDirLock",
    "atomic_write",
    "atomic_torch_save",
    "fetch_weights",
    "looks_like_clip_checkpoint",
    "non_finite_tensors",
]

logger = logging.getLogger(__name__)

TAG_FILE = "last_checkpoint"
LOCK_FILE = ".c2s.lock"


def _temporary_name(path: str) -> str:
    """``.<name>.<pid>.<random>.tmp`` next to ``path``: two writers never share one."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _remove_leftovers(path: str) -> None:
    """Delete temporaries of ``path`` left by killed writers (their process no longer exists)."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[0-9a-f]+\.tmp")
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for other in names:
        found = pattern.fullmatch(other)
        if found and int(found.group(1)) != os.getpid() and not _process_alive(int(found.group(1))):
            try:
                os.remove(os.path.join(folder, other))
            except OSError:
                pass


def atomic_write(path: str, write_fn: Callable[[Any], None], binary: bool = True) -> None:
    """Call ``write_fn(file)`` on a temporary file next to ``path``, then rename it to ``path``.

    The temporary name is ``.<name>.<pid>.<random>.tmp``, unique to the writer; on success, such
    leftovers of killed writers of ``path`` are deleted.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = _temporary_name(path)
    try:
        # O_EXCL: never write into someone else's file; 0o666 & umask, like open()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points to it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _remove_leftovers(path)
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


def looks_like_clip_checkpoint(loaded: Any) -> bool:
    """True for an open_clip / OpenAI CLIP state dict (also inside ``{"state_dict": ...}`` or
    ``{"model": ...}``, keys optionally prefixed by ``module.``): a top-level ``logit_scale`` next
    to the image tower ``visual.*``."""
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping):
        return False
    keys = {
        k[len("module.") :] if k.startswith("module.") else k for k in loaded if isinstance(k, str)
    }
    return "logit_scale" in keys and any(k.startswith("visual.") for k in keys)


def _torchscript_state(filename: str) -> Optional[Dict[str, Any]]:
    """The state dict of a TorchScript archive that holds a CLIP model, else None."""
    try:
        with zipfile.ZipFile(filename) as archive:
            if not any("/code/" in name for name in archive.namelist()):
                return None
        state = torch.jit.load(filename, map_location="cpu").state_dict()
    except Exception:  # not a zip, or not a readable archive: the caller reports the file
        return None
    return state if looks_like_clip_checkpoint(state) else None


def fetch_weights(path: str) -> str:
    """The local file of the checkpoint ``path`` (``MODEL.WEIGHTS``): a local path as it is (its
    query string removed), a URL downloaded.

    ``detectron2://`` and ``http(s)://`` URLs are downloaded once into iopath's cache
    (``$FVCORE_CACHE``, default ``~/.torch/iopath_cache``) and found there afterwards, as
    detectron2 does. A download that fails (no network, an unknown host, an HTTP error, a
    connection cut short) is a ``FileNotFoundError`` naming the URL and what to do instead;
    a full disk keeps its own error.
    """
    url = urlparse(path)._replace(query="").geturl()  # detectron2's ?matching_heuristics=True
    if "://" not in url:
        return url
    try:
        return PathManager.get_local_path(url)
    except (OSError, http.client.HTTPException) as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise FileNotFoundError(_download_failed(url, e)) from e


def _download_failed(url: str, e: BaseException) -> str:
    """The one-line message of a failed download of ``url``."""
    d2 = Detectron2Handler
    https = (
        f" ({d2.S3_DETECTRON2_PREFIX}{url[len(d2.PREFIX) :]})" if url.startswith(d2.PREFIX) else ""
    )
    reason = " ".join(str(e).split())[:160]
    return (
        f"could not download the weights {url}{https} ({type(e).__name__}: {reason}); "
        "download the file on a machine with internet access and set MODEL.WEIGHTS to its local "
        "path (an ImageNet ResNet can also be made from torchvision's weights: python "
        "tools/convert_torchvision_to_d2.py <torchvision .pth> <output .pkl>)"
    )


class OutputDirLock:
    """Exclusive lock of an output folder: ``fcntl.flock`` on ``<folder>/.c2s.lock``.

    The holder writes its PID into the file. The lock is released by :meth:`release`, or by the
    system when the process ends, however it ends. File systems without ``flock`` run unlocked,
    with a warning.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputDirLock":
        """Take the lock, or raise :class:`OutputDirInUseError` without changing the folder."""
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                logger.warning(f"cannot lock {self.path} ({e.strerror}): runs are not exclusive")
                return self
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise OutputDirInUseError(
                f"OUTPUT_DIR {self.folder} is in use by another run ({self._holder()} holds "
                f"{self.path}): wait for it to end, or choose another OUTPUT_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            with open(self.path) as f:
                pid = f.read(32).strip()
        except OSError:
            pid = ""
        return f"process {pid}" if pid.isdigit() else "another process"

    def release(self) -> None:
        """Release the lock (the file stays: deleting it would let two runs lock two files)."""
        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


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
        with self._disk_full_reported(path):
            atomic_torch_save(data, path)
        with self._disk_full_reported(os.path.join(self.save_dir, TAG_FILE)):
            self.tag_last_checkpoint(basename)

    @contextlib.contextmanager
    def _disk_full_reported(self, target: str) -> Iterator[None]:
        """A full disk while writing ``target`` becomes one :class:`DiskFullError` saying what is
        still intact (the atomic writes leave the previous files as they were)."""
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            tag = os.path.join(self.save_dir, TAG_FILE)
            if self.has_checkpoint():
                kept = f"{self.get_checkpoint_file()} and {tag} are intact: free some space, then "
                kept += "run again with --resume"
            else:
                kept = "no earlier checkpoint: free some space, then run again"
            raise DiskFullError(f"No space left on device while saving {target}; {kept}") from e

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        path = os.path.join(self.save_dir, TAG_FILE)
        atomic_write(path, lambda f: f.write(last_filename_basename), binary=False)

    def get_checkpoint_file(self) -> str:
        """The file named by ``last_checkpoint`` ("" if there is no tag); a tag that does not hold
        one file name (binary data, several lines, empty) is an error naming it."""
        if "://" in self.save_dir:
            return super().get_checkpoint_file()
        tag = os.path.join(self.save_dir, TAG_FILE)
        try:
            with open(tag, "rb") as f:
                raw = f.read(4097)
        except FileNotFoundError:
            return ""
        try:
            name = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            name = ""
        if not name or not name.isprintable() or len(raw) > 4096:
            here = sorted(f for f in os.listdir(self.save_dir) if f.endswith(".pth"))
            content = (
                "is empty"
                if not raw.strip()
                else f"holds {len(raw)} bytes that are not a file name"
            )
            raise ValueError(
                f"{tag} {content}: it should hold the file name of the checkpoint to resume from "
                f"(checkpoints here: {_short_list(here, 4) or 'none'}); write that name into it"
            )
        return os.path.join(self.save_dir, name)

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
            if "://" in local:
                fetch_weights(local)  # offline: one clear error (detectron2 gives a traceback)
            elif not os.path.isfile(local):
                raise FileNotFoundError(f"checkpoint file not found: {local}")
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = ""

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            loaded = super()._load_file(filename)
        except Exception as e:  # torch.load / pickle raise many types for a bad file
            scripted = _torchscript_state(filename)  # OpenAI's CLIP files are TorchScript
            if scripted is not None:
                loaded = {"model": scripted}
            else:
                reason = " ".join(str(e).split()).split(". ")[0][:200]  # its first sentence
                raise ValueError(
                    f"cannot read checkpoint {filename} (truncated, corrupt or not a checkpoint "
                    f"file): {type(e).__name__}: {reason}"
                ) from e
        if looks_like_clip_checkpoint(loaded):
            raise ValueError(
                f"{filename} looks like a CLIP checkpoint (weights visual.*, "
                "logit_scale), not a c2s-d2 model: set it as MODEL.CLIP.PRETRAINED (the teacher "
                'and text encoder), and MODEL.WEIGHTS to a c2s-d2 checkpoint or ""'
            )
        return loaded

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
