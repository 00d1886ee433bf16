"""Refusals of train_net.py: each bad input ends the command with one line on stderr naming the
file, key or value, with no traceback unless --verbose, and nothing saved is changed.

Every case runs in this process (the exact message, a few seconds in all). As the real command
(``python train_net.py``: stdout, stderr and the exit code; about 5 s each, mostly imports) six
cases run in the default suite, two at a time, and the others with --run-slow."""

import errno
import fcntl
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from c2s_d2.engine.checkpoint import (
    C2SCheckpointer,
    OutputDirLock,
    atomic_write,
    looks_like_clip_checkpoint,
)
from c2s_d2.utils.errors import (
    DiskFullError,
    OutputDirInUseError,
    is_user_error,
    one_line_error,
)
from test_reliability import (  # noqa: F401  (world: a fixture)
    BASELINE,
    ROOT,
    TINY,
    Tiny,
    digest,
    remove_checkpoints,
    subprocess_env,
    train_net_in_process,
    world,
)

E = "train_net.py: error: "
GARBAGE = bytes(range(128, 256)) + b"\x00\x01"  # not UTF-8, with a NUL: a torn or foreign tag


def snapshot(folder) -> Dict[str, tuple]:
    """Every file under ``folder``: content digest and modification time."""
    found = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            found[os.path.relpath(path, folder)] = (digest(path), os.stat(path).st_mtime_ns)
    return found


def hold_lock(folder) -> int:
    """Lock ``folder`` as a running train_net.py does (flock + PID); returns the descriptor."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, ".c2s.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def corrupt_val_split(src_root: str, dst_root: str, case: str) -> str:
    """A copy of the mini-world with one bad file in its evaluation split; returns the root."""
    shutil.copytree(os.path.join(src_root, "miniworld"), os.path.join(dst_root, "miniworld"))
    val = os.path.join(dst_root, "miniworld", "{}", "val", "000001.png")
    if case == "truncated":
        data = open(val.format("images"), "rb").read()
        with open(val.format("images"), "wb") as f:
            f.write(data[: len(data) // 2])
    else:
        label = Image.open(val.format("labels"))
        label.resize((32, 32), Image.NEAREST).save(val.format("labels"))
    return dst_root


def clip_state_dict_file(path: str) -> str:
    """An open_clip state dict (the tiny C2S-Tiny architecture, random weights)."""
    from c2s_d2.modeling.clip.loader import build_open_clip

    torch.save(build_open_clip("C2S-Tiny", "", random_init_seed=0).state_dict(), path)
    return path


# ------------------------------------------------------------------------------- the cases
class Case(NamedTuple):
    argv: List[str]  # train_net.py arguments (options first: overrides take the rest)
    expected: str  # the exact last line on stderr
    datasets: Optional[str] = None  # DETECTRON2_DATASETS of the run
    watch: Optional[Path] = None  # OUTPUT_DIR holding saved files that must not change
    held: Optional[int] = None  # descriptor of a lock this test process holds during the run


def _config_file(tmp: Path, text: str) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "cfg.yaml").write_text(text)
    return str(tmp / "cfg.yaml")


def _yaml_syntax(tmp: Path, datasets: str) -> Case:
    bad = _config_file(tmp, "MODEL:\n  DEVICE: [cpu\n")
    return Case(
        ["--config-file", bad, "OUTPUT_DIR", str(tmp / "out")],
        f"{E}ValueError: config file {bad}, line 3, column 1: invalid YAML: while parsing a flow "
        "sequence expected ',' or ']', but got '<stream end>'",
    )


def _empty_yaml(tmp: Path, datasets: str) -> Case:
    empty = _config_file(tmp, "")
    return Case(
        ["--config-file", empty, "OUTPUT_DIR", str(tmp / "out")],
        f"{E}ValueError: config file {empty} is empty",
    )


def _unknown_key(tmp: Path, datasets: str) -> Case:
    return Case(
        ["--config-file", BASELINE, "OUTPUT_DIR", str(tmp / "out"), "MODEL.NOT_A_KEY", "1"],
        f"{E}AssertionError: Non-existent key: MODEL.NOT_A_KEY",
    )


def _key_without_value(tmp: Path, datasets: str) -> Case:
    return Case(
        ["--config-file", BASELINE, "OUTPUT_DIR", str(tmp / "out"), "MODEL.DEVICE"],
        f"{E}ValueError: config key MODEL.DEVICE has no value on the command line (overrides are "
        "KEY VALUE pairs)",
    )


def _cuda_without_gpu(tmp: Path, datasets: str) -> Case:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    return Case(
        ["--config-file", BASELINE, "OUTPUT_DIR", str(tmp / "out"), "MODEL.DEVICE", "cuda"],
        f"{E}ValueError: MODEL.DEVICE cuda: no CUDA GPU is available to PyTorch "
        f"{torch.__version__} (torch.cuda.is_available() is False); use MODEL.DEVICE cpu",
    )


def _nan_in_yaml(tmp: Path, datasets: str) -> Case:
    nan = _config_file(tmp, f"_BASE_: {BASELINE}\nSOLVER:\n  BASE_LR: .nan\n")
    return Case(
        ["--config-file", nan, "OUTPUT_DIR", str(tmp / "out")],
        f"{E}ValueError: config key SOLVER.BASE_LR is nan: it must be a finite number",
    )


def _eval_without_weights(tmp: Path, datasets: str) -> Case:
    return Case(
        ["--config-file", BASELINE, "--eval-only", "OUTPUT_DIR", str(tmp / "out"), *TINY,
         "MODEL.WEIGHTS", ""],
        f'{E}ValueError: --eval-only with MODEL.WEIGHTS "" would score a randomly initialised '
        "model: give MODEL.WEIGHTS <checkpoint> (or --allow-random-weights to do it on purpose)",
    )  # fmt: skip


def _clip_weights(tmp: Path, datasets: str) -> Case:
    tmp.mkdir(parents=True, exist_ok=True)
    clip = clip_state_dict_file(str(tmp / "open_clip_tiny.pt"))
    return Case(
        ["--config-file", BASELINE, "--eval-only", "OUTPUT_DIR", str(tmp / "out"), *TINY,
         "MODEL.WEIGHTS", clip],
        f"{E}ValueError: {clip} looks like a CLIP checkpoint (weights visual.*, "
        "logit_scale), not a c2s-d2 model: set it as MODEL.CLIP.PRETRAINED (the teacher and text "
        'encoder), and MODEL.WEIGHTS to a c2s-d2 checkpoint or ""',
    )  # fmt: skip


def _binary_tag(tmp: Path, datasets: str) -> Case:
    out = tmp / "out"
    out.mkdir(parents=True)
    (out / "last_checkpoint").write_bytes(GARBAGE)
    (out / "model_0000001.pth").write_bytes(b"a checkpoint")
    (out / "metrics.json").write_text('{"iteration": 1}\n')
    (out / "config.yaml").write_text("the config of the first run\n")
    return Case(
        ["--config-file", BASELINE, "--resume", "OUTPUT_DIR", str(out), *TINY,
         "SOLVER.MAX_ITER", "3"],
        f"{E}ValueError: {out}/last_checkpoint holds {len(GARBAGE)} bytes that are not a file "
        "name: it should hold the file name of the checkpoint to resume from (checkpoints here: "
        "model_0000001.pth); write that name into it",
        watch=out,
    )  # fmt: skip


def _locked(tmp: Path, datasets: str) -> Case:
    out = tmp / "out"
    (out / "inference").mkdir(parents=True)
    (out / "inference" / "sem_seg_metrics.json").write_text('{"mIoU": 50.0}\n')
    (out / "last_checkpoint").write_text("model_final.pth")
    (out / "model_final.pth").write_bytes(b"a checkpoint")
    return Case(
        ["--config-file", BASELINE, "OUTPUT_DIR", str(out), *TINY, "SOLVER.MAX_ITER", "1"],
        f"{E}OutputDirInUseError: OUTPUT_DIR {out} is in use by another run (process "
        f"{os.getpid()} holds {out}/.c2s.lock): wait for it to end, or choose another OUTPUT_DIR",
        watch=out,
        held=hold_lock(out),
    )


def _bad_val_split(case: str) -> Callable[[Path, str], Case]:
    def build(tmp: Path, datasets: str) -> Case:
        data = corrupt_val_split(datasets, str(tmp / "datasets"), case)
        image, label = (f"{data}/miniworld/{kind}/val/000001.png" for kind in ("images", "labels"))
        expected = {
            "truncated": f"cannot read image {image}: image file is truncated",
            "size": f"image/label size mismatch: {image} is 64x64, {label} is 32x32",
        }[case]
        return Case(
            ["--config-file", BASELINE, "--eval-only", "--allow-random-weights", "OUTPUT_DIR",
             str(tmp / "out"), *TINY, "MODEL.WEIGHTS", ""],
            f"{E}ValueError: {expected}",
            datasets=data,
        )  # fmt: skip

    return build


def _verbose(tmp: Path, datasets: str) -> Case:
    return Case(
        ["--config-file", BASELINE, "--eval-only", "--verbose", "OUTPUT_DIR", str(tmp / "out"),
         *TINY, "MODEL.WEIGHTS", "/nonexistent.pth"],
        f"{E}FileNotFoundError: checkpoint file not found: /nonexistent.pth",
    )  # fmt: skip


CASES: Dict[str, Callable[[Path, str], Case]] = {
    "yaml syntax": _yaml_syntax,
    "empty yaml": _empty_yaml,
    "unknown key": _unknown_key,
    "key without value": _key_without_value,
    "cuda without a GPU": _cuda_without_gpu,
    "nan in yaml": _nan_in_yaml,
    "eval-only without weights": _eval_without_weights,
    "CLIP checkpoint as MODEL.WEIGHTS": _clip_weights,
    "binary last_checkpoint": _binary_tag,
    "OUTPUT_DIR locked by another run": _locked,
    "evaluation split: truncated image": _bad_val_split("truncated"),
    "evaluation split: label size": _bad_val_split("size"),
    "--verbose": _verbose,
}
# as the real command in the default suite: one per stage (config, command line, after the log
# setup, the lock, the data, --verbose); the others with --run-slow
FAST = (
    "yaml syntax",
    "key without value",
    "CLIP checkpoint as MODEL.WEIGHTS",
    "OUTPUT_DIR locked by another run",
    "evaluation split: label size",
    "--verbose",
)


def _unchanged(before: Dict[str, tuple], after: Dict[str, tuple]) -> List[str]:
    """Files saved before the run that it changed or removed, and checkpoints it added
    (log.txt may grow)."""
    changed = [f for f in before if f != "log.txt" and after.get(f, (None,))[0] != before[f][0]]
    return changed + [f for f in after if f not in before and ".pth" in f]


# ------------------------------------------------------------------- in this process
@pytest.mark.parametrize("name", list(CASES))
def test_refusal_in_process(world, tmp_path, monkeypatch, name):  # noqa: F811
    case = CASES[name](tmp_path, os.environ["DETECTRON2_DATASETS"])
    if case.datasets:
        monkeypatch.setenv("DETECTRON2_DATASETS", case.datasets)
    before = snapshot(case.watch) if case.watch else {}
    try:
        message = train_net_in_process(case.argv)
    finally:
        if case.held is not None:
            os.close(case.held)  # releases the lock
    assert message == case.expected
    if case.watch:
        assert _unchanged(before, snapshot(case.watch)) == []
    if name == "OUTPUT_DIR locked by another run":  # not one file touched
        assert snapshot(case.watch) == before


# ------------------------------------------------------------------- as the real command
def _run_commands(names, tmp: Path, datasets: str) -> Dict[str, dict]:
    """``python train_net.py`` for each case, two at a time; with OUTPUT_DIR snapshots."""
    cases = {name: CASES[name](tmp / str(i), datasets) for i, name in enumerate(names)}
    before = {name: snapshot(c.watch) for name, c in cases.items() if c.watch}

    def one(name):
        env = subprocess_env(OMP_NUM_THREADS="1")
        if cases[name].datasets:
            env["DETECTRON2_DATASETS"] = cases[name].datasets
        return subprocess.run(
            [sys.executable, "train_net.py", *cases[name].argv],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            procs = dict(zip(cases, pool.map(one, cases)))
    finally:
        for case in cases.values():
            if case.held is not None:
                os.close(case.held)
    return {
        name: {
            "case": case,
            "proc": procs[name],
            "before": before.get(name),
            "after": snapshot(case.watch) if case.watch else None,
        }
        for name, case in cases.items()
    }


@pytest.fixture(scope="module")
def fast_commands(world, tmp_path_factory):  # noqa: F811
    return _run_commands(
        FAST, tmp_path_factory.mktemp("refusals"), os.environ["DETECTRON2_DATASETS"]
    )


@pytest.fixture(scope="module")
def slow_commands(world, tmp_path_factory):  # noqa: F811
    names = [n for n in CASES if n not in FAST]
    if torch.cuda.is_available():
        names.remove("cuda without a GPU")
    return _run_commands(
        names, tmp_path_factory.mktemp("refusals"), os.environ["DETECTRON2_DATASETS"]
    )


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in CASES]
)
def test_refusal_is_one_line_on_stderr(request, name):
    if name == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    run = request.getfixturevalue("fast_commands" if name in FAST else "slow_commands")[name]
    proc, case = run["proc"], run["case"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines[-1] == case.expected, proc.stderr[-3000:]
    assert sum(x.startswith(E) for x in lines) == 1
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    if name == "--verbose":  # asked for: the traceback, on stderr, before the line
        assert "Traceback (most recent call last)" in proc.stderr
        assert lines[-2] == "FileNotFoundError: checkpoint file not found: /nonexistent.pth"
    else:
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if case.watch:
        assert _unchanged(run["before"], run["after"]) == []
    if name == "OUTPUT_DIR locked by another run":  # not one file touched
        assert run["after"] == run["before"]


def test_traceback_goes_to_the_log_file(fast_commands):
    """Without --verbose, a run that started writing into OUTPUT_DIR keeps the traceback in its
    log.txt (and not on the terminal)."""
    case = fast_commands["CLIP checkpoint as MODEL.WEIGHTS"]["case"]
    log = (Path(case.argv[case.argv.index("OUTPUT_DIR") + 1]) / "log.txt").read_text()
    assert "Traceback (most recent call last)" in log
    assert log.rstrip().splitlines()[-1] == case.expected[len(E) :]


# ------------------------------------------------------------- checks before anything runs
# train_net arguments after the base config and OUTPUT_DIR -> the exact message after the type
PREFLIGHT = {
    "infinite rate": (
        ["SOLVER.BASE_LR", "1e999"],
        "config key SOLVER.BASE_LR is inf: it must be a finite number",
    ),
    "negative rate": (
        ["SOLVER.BASE_LR", "-0.001"],
        "config key SOLVER.BASE_LR is -0.001: it must be > 0",
    ),
    "zero rate": (["SOLVER.BASE_LR", "0.0"], "config key SOLVER.BASE_LR is 0.0: it must be > 0"),
    "zero batch": (
        ["SOLVER.IMS_PER_BATCH", "0"],
        "config key SOLVER.IMS_PER_BATCH is 0: it must be > 0",
    ),
    "negative evaluation period": (
        ["TEST.EVAL_PERIOD", "-1"],
        "config key TEST.EVAL_PERIOD is -1: it must be >= 0",
    ),
    "zero in a list": (
        ["MODEL.PIXEL_STD", "[57.375, 0.0, 57.12]"],
        "config key MODEL.PIXEL_STD is [57.375, 0.0, 57.12]: it must be > 0",
    ),
    "infinity in a list": (
        ["MODEL.PIXEL_MEAN", "[1e999, 0.0, 0.0]"],
        "config key MODEL.PIXEL_MEAN is [inf, 0.0, 0.0]: it must be a finite number",
    ),
    "text for a number": (
        ["SOLVER.BASE_LR", ".nan"],
        "config key SOLVER.BASE_LR (on the command line): expected a float, got the str '.nan'",
    ),
    "not a device": (
        ["MODEL.DEVICE", "gpu"],
        "MODEL.DEVICE 'gpu' is not a device name (cpu, cuda, cuda:N)",
    ),
    "key without value mid-line": (
        ["MODEL.DEVICE", "SOLVER.MAX_ITER", "3"],
        "config key MODEL.DEVICE has no value on the command line (overrides are KEY VALUE pairs)",
    ),
    "option after overrides": (
        ["SOLVER.MAX_ITER", "3", "--resume"],
        "option --resume must come before the KEY VALUE config overrides (they take the rest of "
        "the command line)",
    ),
}


@pytest.mark.parametrize("case", sorted(PREFLIGHT))
def test_preflight_refusal(tmp_path, case):
    extra, expected = PREFLIGHT[case]
    out = tmp_path / "out"
    message = train_net_in_process(["--config-file", BASELINE, "OUTPUT_DIR", str(out), *extra])
    assert message == f"{E}ValueError: {expected}"
    assert not out.exists()  # refused before the output folder was made


def test_yaml_errors_of_other_shapes(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "orphan.yaml").write_text("_BASE_: nope.yaml\n")
    (tmp_path / "group.yaml").write_text(f"_BASE_: {BASELINE}\nSOLVER: 3\n")
    cases = {
        "list.yaml": f"ValueError: config file {tmp_path}/list.yaml: expected KEY: value lines, "
        "got a YAML list",
        "orphan.yaml": f"FileNotFoundError: _BASE_ config file not found: {tmp_path}/nope.yaml "
        f"(named in {tmp_path}/orphan.yaml)",
        "group.yaml": f"ValueError: config key SOLVER (in {tmp_path}/group.yaml): expected a "
        "group of keys, got the int 3",
    }
    for name, expected in cases.items():
        argv = ["--config-file", str(tmp_path / name), "OUTPUT_DIR", str(tmp_path / "out")]
        assert train_net_in_process(argv) == E + expected


def test_infinite_max_norm_is_allowed():
    import train_net
    from detectron2.config import get_cfg

    from c2s_d2 import add_c2s_config

    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = float("inf")  # the max-norm: a real choice
    train_net.check_numbers(cfg)
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = float("nan")
    with pytest.raises(ValueError, match="NORM_TYPE is nan"):
        train_net.check_numbers(cfg)


# ------------------------------------------------------------------------- a full disk
def test_disk_full_while_saving_keeps_previous_checkpoint(world, tmp_path, monkeypatch):  # noqa
    real_save, checkpoints = torch.save, []

    def full_after_first(obj, f, *args, **kwargs):
        # other files (the text-embedding cache) are written as usual
        is_checkpoint = isinstance(obj, dict) and "iteration" in obj
        if not is_checkpoint or not checkpoints:
            checkpoints.extend([obj["iteration"]] if is_checkpoint else [])
            return real_save(obj, f, *args, **kwargs)
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_after_first)
    out = tmp_path / "out"
    message = train_net_in_process(
        ["--config-file", BASELINE, "OUTPUT_DIR", str(out), *TINY, "SOLVER.MAX_ITER", "2",
         "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.EVAL_PERIOD", "0"]
    )  # fmt: skip
    monkeypatch.setattr(torch, "save", real_save)
    assert message == (
        f"{E}DiskFullError: No space left on device while saving {out}/model_0000001.pth; "
        f"{out}/model_0000000.pth and {out}/last_checkpoint are intact: free some space, then run "
        "again with --resume"
    )
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    assert sorted(f for f in os.listdir(out) if ".pth" in f) == ["model_0000000.pth"]  # no temp
    state = torch.load(out / "model_0000000.pth", weights_only=True)
    assert state["iteration"] == 0 and "model" in state
    remove_checkpoints(out)


def test_disk_full_errors_are_user_errors():
    assert is_user_error(OSError(errno.ENOSPC, "No space left on device"))
    assert is_user_error(DiskFullError("No space left on device while saving x.pth"))
    assert not is_user_error(OSError(errno.EIO, "Input/output error"))  # keeps its traceback
    worker = ValueError(
        "Caught OSError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        'last):\n  File "/x/torch/utils/data/_utils/worker.py", line 1, in _worker_loop\n'
        "    data = fetcher.fetch(index)\nOSError: [Errno 28] No space left on device\n"
    )
    assert is_user_error(worker)
    assert one_line_error(worker) == "OSError: [Errno 28] No space left on device"


def test_disk_full_on_the_tag_keeps_the_previous_tag(tmp_path, monkeypatch):
    import c2s_d2.engine.checkpoint as checkpoint_module

    ckpt = C2SCheckpointer(Tiny(), str(tmp_path))
    ckpt.save("model_0000000")
    real = checkpoint_module.atomic_write

    def tag_on_full_disk(path, write_fn, binary=True):
        if os.path.basename(path) == "last_checkpoint":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write_fn, binary)

    monkeypatch.setattr(checkpoint_module, "atomic_write", tag_on_full_disk)
    with pytest.raises(DiskFullError) as err:
        ckpt.save("model_0000001")
    assert str(err.value) == (
        f"No space left on device while saving {tmp_path}/last_checkpoint; "
        f"{tmp_path}/model_0000000.pth and {tmp_path}/last_checkpoint are intact: free some "
        "space, then run again with --resume"
    )
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"


# ------------------------------------------------------------- one writer per temporary file
def test_two_writers_of_one_file_do_not_collide(tmp_path):
    """A second writer of the same file starting while the first is writing (two runs saving
    model_final.pth into one folder): each has its own temporary file, both renames succeed,
    and the file is one complete version."""
    path = str(tmp_path / "model_final.pth")

    def first(f):
        f.write(b"first ")
        atomic_write(path, lambda g: g.write(b"second, complete"))  # the other writer
        f.write(b"complete")

    atomic_write(path, first)
    assert open(path, "rb").read() == b"first complete"
    assert os.listdir(tmp_path) == ["model_final.pth"]


def test_leftovers_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    alive = str(os.getppid())
    for pid in (dead, alive):
        (tmp_path / f".model_final.pth.{pid}.0123abcd.tmp").write_bytes(b"torn")
    (tmp_path / ".other.pth.1.0123abcd.tmp").write_bytes(b"another file's")
    atomic_write(str(tmp_path / "model_final.pth"), lambda f: f.write(b"x"))
    assert sorted(os.listdir(tmp_path)) == [
        f".model_final.pth.{alive}.0123abcd.tmp",  # its writer may still be writing
        ".other.pth.1.0123abcd.tmp",
        "model_final.pth",
    ]


def test_output_dir_lock(tmp_path):
    lock = OutputDirLock(str(tmp_path / "out")).acquire()
    assert (tmp_path / "out" / ".c2s.lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(OutputDirInUseError) as err:
        OutputDirLock(str(tmp_path / "out")).acquire()  # another open file: flock refuses it
    assert str(err.value) == (
        f"OUTPUT_DIR {tmp_path}/out is in use by another run (process {os.getpid()} holds "
        f"{tmp_path}/out/.c2s.lock): wait for it to end, or choose another OUTPUT_DIR"
    )
    assert is_user_error(err.value)
    lock.release()
    with OutputDirLock(str(tmp_path / "out")):  # free again
        pass


# --------------------------------------------------------------------------- checkpoint files
def test_clip_checkpoints_are_recognised():
    clip = {"logit_scale": torch.ones(()), "visual.proj": torch.zeros(2, 2), "text_projection": 0}
    assert looks_like_clip_checkpoint(clip)
    assert looks_like_clip_checkpoint({"model": clip})  # as detectron2 wraps a bare state dict
    training = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in clip.items()}}
    assert looks_like_clip_checkpoint({"model": training})  # open_clip's training checkpoints
    # a c2s-d2 model holding a CLIP teacher is not one: its keys have a prefix
    student = {"model": {f"teacher.clip.{k}": v for k, v in clip.items()}}
    assert not looks_like_clip_checkpoint(student)
    assert not looks_like_clip_checkpoint({"model": Tiny().state_dict()})


class _Visual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.proj(x)


class _ClipLike(torch.nn.Module):
    """The two marks of a CLIP model: an image tower ``visual`` and ``logit_scale``."""

    def __init__(self):
        super().__init__()
        self.visual = _Visual()
        self.logit_scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.visual(x) * self.logit_scale


def test_torchscript_clip_file_is_named_as_clip(tmp_path):
    """OpenAI's CLIP files are TorchScript archives (torch.load refuses them)."""
    path = str(tmp_path / "ViT-B-16.pt")
    torch.jit.save(torch.jit.trace(_ClipLike(), torch.zeros(1, 2)), path)
    with pytest.raises(ValueError, match=r"ViT-B-16\.pt looks like a CLIP checkpoint"):
        C2SCheckpointer(Tiny()).load(path)
    other = str(tmp_path / "scripted.pt")
    torch.jit.save(torch.jit.trace(_Visual(), torch.zeros(1, 2)), other)
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*scripted\.pt \(truncated"):
        C2SCheckpointer(Tiny()).load(other)


def test_cuda_device_checks_count_the_gpus(monkeypatch):
    import train_net
    from detectron2.config import get_cfg

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cuda"
    train_net.check_device(cfg, num_gpus=1)
    with pytest.raises(ValueError) as err:
        train_net.check_device(cfg, num_gpus=2)
    assert str(err.value) == "MODEL.DEVICE cuda with --num-gpus 2 needs 2 GPUs; 1 are visible"
    cfg.MODEL.DEVICE = "cuda:1"
    with pytest.raises(ValueError, match="MODEL.DEVICE cuda:1 with --num-gpus 1 needs 2 GPUs"):
        train_net.check_device(cfg, num_gpus=1)
    cfg.MODEL.DEVICE = "cpu"
    train_net.check_device(cfg, num_gpus=4)  # CPU processes (gloo) need no GPU


@pytest.mark.parametrize(
    "content, problem",
    [(GARBAGE, f"holds {len(GARBAGE)} bytes that are not a file name"), (b"", "is empty"),
     (b"  \n", "is empty"), (b"model_0000001.pth\nmodel_final.pth", "holds 33 bytes that are not "
                                                                    "a file name")],
)  # fmt: skip
def test_last_checkpoint_must_hold_one_file_name(tmp_path, content, problem):
    (tmp_path / "last_checkpoint").write_bytes(content)
    with pytest.raises(ValueError) as err:
        C2SCheckpointer(Tiny(), str(tmp_path)).get_checkpoint_file()
    assert str(err.value) == (
        f"{tmp_path}/last_checkpoint {problem}: it should hold the file name of the checkpoint to "
        "resume from (checkpoints here: none); write that name into it"
    )
    (tmp_path / "last_checkpoint").write_bytes(b"model_final.pth\n")
    assert C2SCheckpointer(Tiny(), str(tmp_path)).get_checkpoint_file() == str(
        tmp_path / "model_final.pth"
    )


# ---------------------------------------------------------------------- the evaluation mapper
def test_evaluation_mapper_gives_detectron2s_test_inputs(tmp_path):
    """Same tensors as detectron2's DatasetMapper(cfg, False) on a non-square image that the
    test resize changes, plus the checks."""
    from detectron2.config import get_cfg
    from detectron2.data import DatasetMapper

    from c2s_d2 import add_c2s_config
    from c2s_d2.data import C2SSemanticDatasetMapper

    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 32, 1000
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    Image.fromarray(rng.integers(0, 4, (48, 80), dtype=np.uint8)).save(tmp_path / "l.png")
    record = {"file_name": str(tmp_path / "i.png"), "sem_seg_file_name": str(tmp_path / "l.png")}
    ours = C2SSemanticDatasetMapper(cfg, False)(record)
    stock = DatasetMapper(cfg, False)(record)
    assert ours["image"].shape == (3, 32, 53)
    assert torch.equal(ours["image"], stock["image"])
    assert torch.equal(ours["sem_seg"], stock["sem_seg"])
    assert (ours["height"], ours["width"]) == (stock["height"], stock["width"]) == (48, 80)
    assert sorted(ours) == sorted(stock)
    assert "sem_seg_file_name" in record  # the record itself is not changed

    Image.fromarray(np.zeros((40, 80), np.uint8)).save(tmp_path / "l.png")
    with pytest.raises(ValueError) as err:
        C2SSemanticDatasetMapper(cfg, False)(record)
    assert str(err.value) == (
        f"image/label size mismatch: {tmp_path}/i.png is 80x48, {tmp_path}/l.png is 80x40"
    )
    with pytest.raises(ValueError, match=r"i\.png is 80x48, its dataset record says 80x50"):
        C2SSemanticDatasetMapper(cfg, False)({**record, "height": 50, "width": 80})


# ------------------------------------------------------------- a weights URL on an offline machine
R50_URL = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
R50_HTTPS = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/torchvision/R-50.pkl"
OFFLINE_MESSAGE = (
    f"FileNotFoundError: could not download the weights {R50_URL} ({R50_HTTPS}) (URLError: "
    "<urlopen error [Errno -2] Name or service not known>); download the file on a machine with "
    "internet access and set MODEL.WEIGHTS to its local path (an ImageNet ResNet can also be made "
    "from torchvision's weights: python tools/convert_torchvision_to_d2.py <torchvision .pth> "
    "<output .pkl>)"
)


@pytest.fixture
def offline(tmp_path, monkeypatch) -> List[str]:
    """No network: every URL opened fails as urllib fails on a machine without DNS (measured
    here: ``URLError(gaierror(-2, 'Name or service not known'))``), with an empty download cache.
    Returns the URLs that were tried."""
    import socket
    import urllib.error
    import urllib.request

    tried = []

    def no_network(url, *args, **kwargs):
        tried.append(getattr(url, "full_url", url))
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", no_network)  # what iopath's download calls
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "download_cache"))
    return tried


def test_weights_url_offline_is_one_line(offline, tmp_path):
    """The configs' ``detectron2://`` ImageNet URL, offline: train_net.py ends with one line
    naming the URL and what to do, before the run is set up (no log, no CLIP text encoding)."""
    out = tmp_path / "out"
    message = train_net_in_process(
        ["--config-file", BASELINE, "OUTPUT_DIR", str(out), *TINY, "MODEL.WEIGHTS", R50_URL]
    )
    assert message == E + OFFLINE_MESSAGE
    assert offline == [R50_HTTPS]  # the download was tried once, at the real address
    assert sorted(os.listdir(out)) == [".c2s.lock"]  # nothing set up, nothing written


def test_weights_url_offline_when_loading(offline, tmp_path, capsys):
    """The same message where a checkpointer loads the URL itself (--eval-only, the demo)."""
    with pytest.raises(FileNotFoundError) as err:
        C2SCheckpointer(Tiny()).load(R50_URL + "?matching_heuristics=True")
    assert one_line_error(err.value) == OFFLINE_MESSAGE
    assert is_user_error(err.value)

    import importlib.util

    spec = importlib.util.spec_from_file_location("c2s_demo", os.path.join(ROOT, "demo/demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(image)
    code = demo.main(
        ["--config-file", BASELINE, "--input", str(image), "--output", str(tmp_path / "demo"),
         "--opts", *TINY, "MODEL.WEIGHTS", R50_URL]
    )  # fmt: skip
    assert code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert lines[-1] == f"demo.py: error: {OFFLINE_MESSAGE}"
    assert offline == [R50_HTTPS, R50_HTTPS]  # one try each
