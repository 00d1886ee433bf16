"""Class text embeddings from the CLIP text encoder, with prompt ensembling and a disk cache.

For class ``c`` with text names (synonyms) ``S_c`` and templates ``T``::

    t_c = normalise( mean over s in S_c, tau in T of normalise(E(tau(s))) )

where ``E`` is the CLIP text encoder. The result depends only on (model, weights, templates,
names); it is computed once and cached as a ``.pt`` file keyed by their sha1. With a cached file
no CLIP model (not even the text tower) is built.

At real scale (COCO-Stuff with the ``imagenet80`` templates and the latent vocabulary: about
99,000 prompts) encoding is a one-off cost worth organising:

* prompts are encoded in batches (``batch_size``, ``MODEL.CLIP.TEXT_BATCH_SIZE``) on the model's
  device (``MODEL.DEVICE``; the CPU, with a warning, when that device is unavailable), under
  ``torch.no_grad``, with a progress bar on stderr when there is more than one batch;
* one process encodes, the others wait and then read its cache file: under ``torch.distributed``
  the local rank 0 encodes while the other ranks wait at a barrier; independent processes on one
  machine (parallel benchmark jobs sharing a cache folder) take an ``fcntl`` lock on the cache
  entry, so the second one waits for the first one's file instead of encoding again;
* a cache file holds its key material and the sha256 of its embeddings; a file that is
  unreadable, holds another key, has the wrong shape, non-finite values, rows that are not unit
  norm (a zeroed block gives zero rows) or a checksum mismatch is re-encoded with a one-line
  WARNING and rewritten atomically (a per-process temporary file, then ``os.replace``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from typing import Callable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.utils import comm
from tqdm import tqdm

from .loader import HF_HUB_PREFIX, build_open_clip, get_model_config, get_tokenizer
from .loader import weights_identity
from .templates import get_templates

try:  # POSIX only; elsewhere concurrent processes may encode the same entry twice
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)

# 2: files hold their key and the sha256 of the embeddings (version 1 files are never read:
# the version is part of the file name's digest).
CACHE_FORMAT_VERSION = 2
DEFAULT_BATCH_SIZE = 256  # prompts per text-encoder forward
NORM_TOLERANCE = 1e-3  # a cached row whose L2 norm is further than this from 1 is invalid
_MISSING = "no such file"

ClassTextNames = Sequence[Union[str, Sequence[str]]]
DeviceLike = Union[str, torch.device]

_devices_warned: Set[str] = set()


def check_class_text_names(class_text_names: ClassTextNames) -> List[List[str]]:
    """Validate per-class synonym lists; a bare string counts as a one-name list.

    Raises ``ValueError`` for an empty class list, a class without names, or an empty name.
    """
    if len(class_text_names) == 0:
        raise ValueError("class_text_names is empty: no classes to embed")
    out = []
    for i, names in enumerate(class_text_names):
        names = [names] if isinstance(names, str) else list(names)
        if len(names) == 0:
            raise ValueError(f"class {i} has no text names")
        for name in names:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"class {i} has an empty or non-string text name: {name!r}")
        out.append([n.strip() for n in names])
    return out


def build_prompts(
    class_text_names: Sequence[Sequence[str]], templates: Sequence[str]
) -> Tuple[List[str], torch.Tensor]:
    """Every (class, synonym, template) sentence.

    Returns:
        prompts: list of P strings, class by class, synonym by synonym, template by template.
        class_index: [P] int64, the class of each prompt.
    """
    prompts, class_index = [], []
    for c, names in enumerate(class_text_names):
        for name in names:
            # str.replace, not format(): names may contain braces.
            prompts += [t.replace("{}", name) for t in templates]
            class_index += [c] * len(templates)
    return prompts, torch.tensor(class_index, dtype=torch.long)


def ensemble_prompt_embeddings(
    prompt_embeddings: torch.Tensor, class_index: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Prompt ensembling: [P, d] embeddings + [P] class ids -> [C, d] unit-norm class embeddings.

    Each prompt embedding is L2-normalised, averaged over its class (all synonyms and
    templates), and the mean is normalised again.
    """
    unit = F.normalize(prompt_embeddings.float(), dim=-1)
    sums = unit.new_zeros(num_classes, unit.shape[1]).index_add_(
        0, class_index.to(unit.device), unit
    )
    counts = torch.bincount(class_index, minlength=num_classes).to(unit)
    if (counts == 0).any():
        raise ValueError(f"classes {torch.nonzero(counts == 0).flatten().tolist()} have no prompts")
    return F.normalize(sums / counts[:, None], dim=-1)


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` as an int; ``ValueError`` unless it is a positive integer."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"text-encoder batch size (MODEL.CLIP.TEXT_BATCH_SIZE) must be a positive integer, "
            f"got {batch_size!r}"
        )
    return batch_size


def resolve_device(device: DeviceLike) -> torch.device:
    """The device to encode text on: ``device`` when it can hold a tensor, else the CPU.

    An unavailable device (``"cuda"`` on a machine without a GPU, ``"cuda:3"`` with two GPUs)
    falls back to the CPU with one WARNING per device name; a string that is not a device name
    at all raises ``ValueError``.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"text-encoder device {device!r} (MODEL.DEVICE) is not a torch device"
        ) from e
    if dev.type == "cpu":
        return dev
    try:
        torch.empty(1, device=dev)
    except Exception as e:  # no driver, no such index, a build without that backend...
        if str(dev) not in _devices_warned:
            _devices_warned.add(str(dev))
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            logger.warning(
                "text encoder: device %r (MODEL.DEVICE) is unavailable (%s); encoding the text "
                "embeddings on the CPU instead, which is slow for large prompt sets",
                str(device),
                reason,
            )
        return torch.device("cpu")
    return dev


def encode_prompts(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[List[str]], torch.Tensor],
    prompts: Sequence[str],
    device: DeviceLike = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> torch.Tensor:
    """Encode prompts in batches: P strings -> [P, d] float32 on ``device`` (not normalised).

    Runs under ``torch.no_grad`` (not inference mode: the result may end up in a buffer that
    autograd saves). With ``progress`` a tqdm bar on stderr counts prompts when there is more
    than one batch.
    """
    batch_size = check_batch_size(batch_size)
    if len(prompts) == 0:
        raise ValueError("no prompts to encode")
    num_batches = math.ceil(len(prompts) / batch_size)
    bar = tqdm(
        total=len(prompts),
        desc="CLIP text embeddings",
        unit="prompt",
        file=sys.stderr,
        disable=not progress or num_batches <= 1,
        dynamic_ncols=True,
    )
    out = []
    with torch.no_grad(), bar:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            tokens = tokenizer(batch).to(device)
            out.append(encode_text(tokens).float())
            bar.update(len(batch))
    return torch.cat(out, dim=0)


def default_cache_dir() -> str:
    """``$C2S_CACHE/text_embeddings`` if ``$C2S_CACHE`` is set, else
    ``~/.cache/c2s_d2/text_embeddings``."""
    root = os.environ.get("C2S_CACHE") or os.path.join("~", ".cache", "c2s_d2")
    return os.path.join(os.path.expanduser(root), "text_embeddings")


def _cache_key(
    model_name: str,
    weights: str,
    templates: Sequence[str],
    class_text_names: Sequence[Sequence[str]],
    model_config: Optional[dict],
) -> str:
    """The key material of a cache entry, as canonical JSON (hashed into the file name and
    stored in the file)."""
    key = {
        "version": CACHE_FORMAT_VERSION,
        "model_name": model_name,
        # A registered JSON edited in place must not reuse stale embeddings.
        "model_config": model_config,
        "weights": weights,
        "templates": list(templates),
        "class_text_names": [list(n) for n in class_text_names],
    }
    return json.dumps(key, sort_keys=True)


def text_embedding_cache_path(
    cache_dir: str,
    model_name: str,
    weights: str,
    templates: Sequence[str],
    class_text_names: Sequence[Sequence[str]],
    model_config: Optional[dict] = None,
) -> str:
    """The cache file of one (model, weights identity, templates, names) key."""
    key = _cache_key(model_name, weights, templates, class_text_names, model_config)
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name)
    return os.path.join(cache_dir, f"{slug}-{digest}.pt")


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's bytes, as laid out contiguously on the CPU."""
    array = tensor.detach().cpu().contiguous().numpy()
    return hashlib.sha256(array.tobytes()).hexdigest()


def check_cache_content(
    data: object, key: str, num_classes: int, embed_dim: Optional[int] = None
) -> Tuple[Optional[torch.Tensor], str]:
    """Validate a loaded cache dict: ``(embeddings [C, d], "")`` or ``(None, reason)``.

    Checks, in order: the format version and key material, the shape ``[num_classes,
    embed_dim]`` (any ``d > 0`` when ``embed_dim`` is None), float32, finite values, unit-norm
    rows (within ``NORM_TOLERANCE``; catches zeroed rows) and the stored sha256.
    """
    if not isinstance(data, dict):
        return None, f"it holds a {type(data).__name__}, not a dict"
    version = data.get("format_version")
    if version != CACHE_FORMAT_VERSION:
        return None, f"format version {version!r}, expected {CACHE_FORMAT_VERSION}"
    if data.get("key") != key:
        return None, "its key (model, weights, templates or class names) differs"
    emb = data.get("embeddings")
    if not isinstance(emb, torch.Tensor):
        return None, "no embeddings tensor"
    want = (num_classes, embed_dim if embed_dim is not None else "d > 0")
    if emb.dim() != 2 or emb.shape[0] != num_classes or emb.shape[1] == 0:
        return None, f"embeddings of shape {tuple(emb.shape)}, expected {want}"
    if embed_dim is not None and emb.shape[1] != embed_dim:
        return None, f"embeddings of shape {tuple(emb.shape)}, expected {want}"
    if emb.dtype != torch.float32:
        return None, f"embeddings of dtype {emb.dtype}, expected torch.float32"
    finite = torch.isfinite(emb)
    if not finite.all():
        return None, f"{int((~finite).sum())} NaN/inf values"
    norms = emb.norm(dim=-1)
    zero = torch.nonzero(norms == 0).flatten().tolist()
    if zero:
        return None, f"{len(zero)} all-zero class rows (first: {zero[:5]})"
    off = torch.nonzero((norms - 1).abs() > NORM_TOLERANCE).flatten().tolist()
    if off:
        return None, f"rows {off[:5]} are not unit-norm (norms {norms[off[:5]].tolist()})"
    digest = tensor_sha256(emb)
    if digest != data.get("sha256"):
        return None, f"checksum mismatch (sha256 {digest[:12]}..., stored {data.get('sha256')!r})"
    return emb, ""


def _read_cache(
    path: str, key: str, num_classes: int, embed_dim: Optional[int]
) -> Tuple[Optional[torch.Tensor], str]:
    """``(embeddings, "")`` from a valid cache file, else ``(None, reason)``."""
    if not os.path.isfile(path):
        return None, _MISSING
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbage, foreign pickles
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        return None, f"unreadable ({type(e).__name__}: {first_line})"
    return check_cache_content(data, key, num_classes, embed_dim)


def _save_atomically(path: str, data: dict) -> None:
    """torch.save to a temporary file (unique per process) in the same folder, then os.replace:
    readers see the old file or the whole new one, never a torn one."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    prefix = f".{os.path.basename(path)}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def lock_file_path(path: str) -> str:
    """The lock file of a cache entry: a hidden file next to it (kept after use)."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on the cache entry ``path`` while the block runs.

    Another process holding it makes this one wait (an INFO line says so). Where locking is
    impossible (no fcntl, a read-only folder, a file system without locks) the block runs
    unlocked after a WARNING.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path = lock_file_path(path)
    try:
        os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        logger.warning("cannot open lock file %s (%s); encoding without a lock", lock_path, e)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to write the text embeddings %s", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # e.g. ENOLCK on some network file systems
            logger.warning("cannot lock %s (%s); encoding without a lock", lock_path, e)
        yield
    finally:
        os.close(fd)  # releases the lock


def _load_or_encode_locked(
    path: str,
    read: Callable[[], Tuple[Optional[torch.Tensor], str]],
    encode: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """A valid cache file's embeddings, else encode them, holding the entry's file lock."""
    emb, _ = read()
    if emb is not None:  # the common case: no lock needed to read a complete file
        return emb
    with _file_lock(path):
        emb, reason = read()  # another process may have written it while this one waited
        if emb is not None:
            return emb
        if reason != _MISSING:
            logger.warning(
                "re-encoding text embeddings: cache file %s is invalid: %s", path, reason
            )
        return encode()


def _is_encoding_rank() -> bool:
    """Whether this process encodes for its machine: local rank 0 (detectron2's local process
    group, else ``$LOCAL_RANK``, else global rank 0)."""
    try:
        return comm.get_local_rank() == 0
    except AssertionError:  # no local process group (not started by detectron2's launch)
        pass
    local = os.environ.get("LOCAL_RANK", "").strip()
    if local.isdigit():
        return int(local) == 0
    return comm.get_rank() == 0


def _load_or_encode(
    path: str,
    read: Callable[[], Tuple[Optional[torch.Tensor], str]],
    encode: Callable[[], torch.Tensor],
    distributed: bool,
) -> torch.Tensor:
    """One process encodes, the others read its file.

    Without a process group the file lock serialises processes. With one, the encoding rank of
    each machine loads or encodes first while the other ranks wait at a barrier, then read the
    file (they encode themselves only if it is still missing or invalid, e.g. a cache folder
    that is not shared between machines when detectron2's local process group is unknown).
    """
    if not distributed:
        return _load_or_encode_locked(path, read, encode)
    leader = _is_encoding_rank()
    emb, error = None, None
    if leader:
        try:
            emb = _load_or_encode_locked(path, read, encode)
        except Exception as e:  # reach the barrier anyway: the other ranks must not hang
            error = e
    comm.synchronize()
    if error is not None:
        raise error
    if not leader:
        emb = _load_or_encode_locked(path, read, encode)
    return emb


def text_embeddings(
    class_text_names: ClassTextNames,
    model_name: str,
    pretrained: str,
    templates: Union[str, Sequence[str]] = "short",
    random_init_seed: int = 0,
    config_files: Sequence[str] = (),
    cache_dir: Optional[str] = None,
    device: DeviceLike = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    encode_device: Optional[DeviceLike] = None,
    distributed: Optional[bool] = None,
    quick_gelu: str = "auto",
) -> torch.Tensor:
    """Unit-norm class text embeddings [C, d] (prompt ensembling), cached on disk.

    Args:
        class_text_names: per class, its text names (synonyms are averaged); a string is one name.
        model_name, pretrained, random_init_seed, config_files: the CLIP model, as in
            ``loader.build_open_clip``.
        templates: a template set name, a template file path, or a list of templates.
        cache_dir: cache folder; ``None`` or ``""`` -> ``default_cache_dir()``.
        device: where the result is returned.
        batch_size: prompts per text-encoder forward.
        encode_device: where the text encoder runs (``None``: ``device``); the CPU, with a
            warning, when it is unavailable.
        distributed: whether to coordinate with a ``torch.distributed`` process group (``None``:
            when one with more than one process exists). Then every process of the group must
            call this function (it holds a barrier).
    """
    names = check_class_text_names(class_text_names)
    template_list = get_templates(templates)
    batch_size = check_batch_size(batch_size)
    model_config = None
    if not model_name.startswith(HF_HUB_PREFIX):
        model_config = get_model_config(model_name, config_files)  # registers, reads JSON only
    weights = weights_identity(pretrained, random_init_seed, model_name, quick_gelu)
    key = _cache_key(model_name, weights, template_list, names, model_config)
    path = text_embedding_cache_path(
        cache_dir or default_cache_dir(), model_name, weights, template_list, names, model_config
    )
    embed_dim = model_config.get("embed_dim") if model_config else None

    def read() -> Tuple[Optional[torch.Tensor], str]:
        return _read_cache(path, key, len(names), embed_dim)

    def encode() -> torch.Tensor:
        dev = resolve_device(device if encode_device is None else encode_device)
        prompts, class_index = build_prompts(names, template_list)
        logger.info(
            "encoding %d prompts (%d classes, %d names, %d templates) with %s (%s) on %s, "
            "%d prompts per batch",
            len(prompts),
            len(names),
            sum(len(n) for n in names),
            len(template_list),
            model_name,
            weights,
            dev,
            batch_size,
        )
        start = time.perf_counter()
        text_model = build_open_clip(
            model_name,
            pretrained,
            random_init_seed,
            config_files,
            text_only=True,
            quick_gelu=quick_gelu,
        ).to(dev)
        tokenizer = get_tokenizer(model_name, config_files)
        try:
            prompt_emb = encode_prompts(text_model.encode_text, tokenizer, prompts, dev, batch_size)
            emb = ensemble_prompt_embeddings(prompt_emb, class_index, len(names)).cpu()
        finally:
            del text_model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        data = {
            "embeddings": emb,
            "sha256": tensor_sha256(emb),
            "key": key,
            "class_text_names": names,
            "templates": template_list,
            "model_name": model_name,
            "weights": weights,
            "format_version": CACHE_FORMAT_VERSION,
        }
        emb, reason = check_cache_content(data, key, len(names), embed_dim)
        if emb is None:
            raise RuntimeError(
                f"text encoder {model_name} ({weights}) gave invalid embeddings: {reason}"
            )
        try:
            _save_atomically(path, data)
            logger.info(
                "text embeddings encoded in %.1f s, cached at %s", time.perf_counter() - start, path
            )
        except OSError as e:  # a read-only cache folder must not stop training
            logger.warning("could not write the text-embedding cache %s (%s)", path, e)
        return emb

    if distributed is None:
        distributed = comm.get_world_size() > 1
    emb = _load_or_encode(path, read, encode, distributed)
    return emb.to(device)


def text_embeddings_from_cfg(
    cfg, class_text_names: ClassTextNames, device: DeviceLike = "cpu"
) -> torch.Tensor:
    """``text_embeddings`` with the model, weights, templates, cache and batch size of
    ``cfg.MODEL.CLIP``, encoded on ``cfg.MODEL.DEVICE``; the result is returned on ``device``."""
    clip = cfg.MODEL.CLIP
    return text_embeddings(
        class_text_names,
        model_name=clip.MODEL_NAME,
        pretrained=clip.PRETRAINED,
        templates=clip.TEXT_TEMPLATES,
        random_init_seed=clip.RANDOM_INIT_SEED,
        config_files=tuple(clip.MODEL_CONFIG_FILES),
        cache_dir=clip.TEXT_EMBED_CACHE_DIR or None,
        device=device,
        batch_size=clip.TEXT_BATCH_SIZE,
        encode_device=cfg.MODEL.DEVICE,
        quick_gelu=clip.QUICK_GELU,
    )
