"""Reliability (fast part): crash-safe checkpoints, strict loading, RNG states, the resumable data
order, errors of worker processes, a NaN loss through train_net, exact resume of a short run,
and bad input through train_net. The long checks are in test_reliability_slow.py."""

import hashlib
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from c2s_d2.engine import (
    C2SCheckpointer,
    ResumableTrainingSampler,
    ResumableTrainLoader,
    capture_rng_state,
    non_finite_losses,
    restore_rng_state,
    rng_isolated,
    seeded_rng,
)
from c2s_d2.utils.errors import NonFiniteError, is_user_error, one_line_error, remote_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(ROOT, "configs/miniworld/zs_baseline_R18.yaml")
C2S_FULL = os.path.join(ROOT, "configs/miniworld/c2s_full_R18.yaml")
# tests/test_end_to_end.py's tiny student, on 64x64 mini-world images
TINY = [
    "MODEL.C2S.DEC_LAYERS", "2",
    "MODEL.C2S.NUM_OBJECT_QUERIES", "8",
    "MODEL.C2S.HIDDEN_DIM", "64",
    "MODEL.C2S.PIXEL_DECODER.CONV_DIM", "64",
    "MODEL.C2S.PIXEL_DECODER.MASK_DIM", "64",
    "SOLVER.IMS_PER_BATCH", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.CROP.SIZE", "(64, 64)",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64",
]  # fmt: skip
# no warmup and a larger step: the weights really move within a few iterations
LEARN = ["SOLVER.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "0.001"]
C2S_FAST = [
    "MODEL.CLIP.PRETRAINED", "",
    "MODEL.C2S.DISTILL.LATENT.VOCABULARY", "",
    "MODEL.C2S.DISTILL.TEACHER_INPUT_SIZE", "64",
]  # fmt: skip
WORLD = {"C2S_MINIWORLD_NUM_TRAIN": "12", "C2S_MINIWORLD_NUM_VAL": "4", "C2S_MINIWORLD_SIZE": "64"}
METRICS = os.path.join("inference", "c2s_miniworld_val", "sem_seg_metrics.json")


# ---------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A generated 64x64 mini-world; its variables are set in this process while tests run."""
    from c2s_d2.data.miniworld import ensure_miniworld

    root = tmp_path_factory.mktemp("reliability")
    env = {**WORLD, "DETECTRON2_DATASETS": str(root / "datasets")}
    ensure_miniworld(str(root / "datasets" / "miniworld"), num_train=12, num_val=4, size=64)
    with pytest.MonkeyPatch.context() as mp:  # restores the environment afterwards
        for k, v in env.items():
            mp.setenv(k, v)
        yield root


def subprocess_env(**extra) -> dict:
    """This process's environment (mini-world, text cache) for train_net.py subprocesses."""
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2", **extra}


def train_net_subprocess(argv, env=None, script=None):
    cmd = [sys.executable, script or "train_net.py", *argv]
    return subprocess.run(
        cmd, cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=900
    )


def train_net_in_process(argv) -> str:
    """Run train_net.py's entry point here; returns its exit message ("" on success)."""
    import train_net

    args = train_net.argument_parser().parse_args(argv)
    try:
        train_net.run(args)
    except SystemExit as e:
        return str(e.code)
    return ""


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def differing_weights(a: str, b: str) -> list:
    """Keys whose tensors differ (bitwise) between two checkpoints' models."""
    sa = torch.load(a, map_location="cpu", weights_only=True)["model"]
    sb = torch.load(b, map_location="cpu", weights_only=True)["model"]
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def remove_checkpoints(*folders) -> None:
    """Checkpoints are 140 MB each even for the tiny student: do not leave them in /tmp."""
    for folder in folders:
        for name in os.listdir(folder):
            if ".pth" in name:
                os.remove(os.path.join(folder, name))


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Tiny(nn.Module):
    def __init__(self, width: int = 3):
        super().__init__()
        self.layer = nn.Linear(width, 2)
        self.register_buffer("count", torch.zeros(1))


# ---------------------------------------------------------------------- crash-safe checkpoints
def test_crash_mid_save_keeps_previous_checkpoint_and_tag(tmp_path, monkeypatch):
    model = Tiny()
    ckpt = C2SCheckpointer(model, str(tmp_path))
    ckpt.save("model_final", iteration=1)
    before = digest(tmp_path / "model_final.pth")
    good = {k: v.clone() for k, v in model.state_dict().items()}

    real_save = torch.save

    def crash_half_way(obj, f, *args, **kwargs):
        # write half of a real serialisation, then die like a full disk or a killed process
        buf = __import__("io").BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    with torch.no_grad():
        model.layer.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save("model_final", iteration=2)
    with pytest.raises(OSError):
        ckpt.save("model_0000002", iteration=2)
    monkeypatch.setattr(torch, "save", real_save)

    assert digest(tmp_path / "model_final.pth") == before
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]  # no temp left
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    fresh = Tiny()
    C2SCheckpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, good[k]), k


def test_tag_is_written_after_the_checkpoint(tmp_path, monkeypatch):
    import c2s_d2.engine.checkpoint as checkpoint_module

    model = Tiny()
    ckpt = C2SCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000000")
    real = checkpoint_module.atomic_write

    def fail_on_tag(path, write_fn, binary=True):
        if os.path.basename(path) == "last_checkpoint":
            raise KeyboardInterrupt  # killed between the checkpoint and its tag
        return real(path, write_fn, binary)

    monkeypatch.setattr(checkpoint_module, "atomic_write", fail_on_tag)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000001")
    # the new file is complete; the tag still names the previous complete file
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    for name in ("model_0000000.pth", "model_0000001.pth"):
        assert "model" in torch.load(tmp_path / name, weights_only=True)


def test_non_finite_weights_are_never_saved(tmp_path):
    model = Tiny()
    ckpt = C2SCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000000", iteration=0)
    with torch.no_grad():
        model.layer.bias[1] = float("inf")
    with pytest.raises(NonFiniteError) as err:
        ckpt.save("model_0000001", iteration=1)
    assert str(err.value) == (
        f"weights layer.bias are not finite at iteration 1; model_0000001.pth was not written "
        f"(last checkpoint: {tmp_path / 'model_0000000.pth'})"
    )
    assert not (tmp_path / "model_0000001.pth").exists()
    assert is_user_error(err.value)


# ---------------------------------------------------------------------------- strict loading
def test_shape_mismatch_fails_listing_the_keys(tmp_path):
    C2SCheckpointer(Tiny(width=5), str(tmp_path)).save("other")
    path = str(tmp_path / "other.pth")
    with pytest.raises(ValueError) as err:
        C2SCheckpointer(Tiny(width=3)).load(path)
    assert str(err.value) == (
        f"checkpoint {path} does not fit the model (another architecture or config?): 1 tensors "
        "have other shapes: layer.weight (2, 5) in the file vs (2, 3) in the model"
    )


def test_no_common_key_and_missing_keys(tmp_path):
    path = str(tmp_path / "foreign.pth")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ValueError, match=r"shares no parameter name with the model .*fc\.weight"):
        C2SCheckpointer(Tiny()).load(path)
    partial = str(tmp_path / "partial.pth")
    torch.save({"model": {"layer.weight": torch.zeros(2, 3)}}, partial)
    C2SCheckpointer(Tiny()).load(partial)  # training: a partial file is a warning only
    with pytest.raises(
        ValueError, match=r"leaves 2 model tensors unfilled .*: count, layer\.bias$"
    ):
        C2SCheckpointer(Tiny(), require_all_keys=True).load(partial)


def test_missing_truncated_and_dangling_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: /nonexistent.pth"):
        C2SCheckpointer(Tiny()).load("/nonexistent.pth")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(
        ValueError, match=r"cannot read checkpoint .*notes\.pth \(truncated, corrupt"
    ):
        C2SCheckpointer(Tiny()).load(str(tmp_path / "notes.pth"))
    os.remove(tmp_path / "notes.pth")
    C2SCheckpointer(Tiny(), str(tmp_path)).save("model_final")
    data = (tmp_path / "model_final.pth").read_bytes()
    (tmp_path / "model_final.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*model_final\.pth \(truncated"):
        C2SCheckpointer(Tiny(), str(tmp_path)).resume_or_load("", resume=True)
    os.remove(tmp_path / "model_final.pth")
    with pytest.raises(FileNotFoundError, match=r"last_checkpoint names .*model_final\.pth, which"):
        C2SCheckpointer(Tiny(), str(tmp_path)).resume_or_load("", resume=True)


# ------------------------------------------------------------------------------- RNG states
def _draws():
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)])


def test_rng_state_roundtrip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    torch.save(capture_rng_state(), tmp_path / "rng.pth")
    expected = _draws()
    _draws()
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert _draws() == expected


def test_rng_isolation_and_seeded_streams():
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    expected = _draws()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    with rng_isolated():
        _draws()
    with seeded_rng(7, 123):
        first = _draws()
    assert _draws() == expected  # the outer streams did not move
    with seeded_rng(7, 123):
        assert _draws() == first
    with seeded_rng(7, 124):
        assert _draws() != first


# ------------------------------------------------------------------------ resumable data order
def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_sampler_resumes_at_any_position_and_splits_over_processes():
    full = _take(iter(ResumableTrainingSampler(5, seed=1, rank=0, world_size=1)), 23)
    assert [k[1] for k in full] == list(range(23))
    epochs = [sorted(k[2] for k in full[e * 5 : e * 5 + 5]) for e in range(4)]
    assert all(e == [0, 1, 2, 3, 4] for e in epochs)  # each epoch is a permutation
    assert [k[2] for k in full[:5]] != [k[2] for k in full[5:10]]  # reshuffled every epoch
    resumed = ResumableTrainingSampler(5, seed=1, rank=0, world_size=1)
    resumed.start_position = 12
    assert _take(iter(resumed), 11) == full[12:]
    ranks = []
    for r in range(2):
        s = ResumableTrainingSampler(5, seed=1, rank=r, world_size=2)
        s.start_position = 4
        ranks.append(_take(iter(s), 5))
    assert ranks[0] == full[4:14:2] and ranks[1] == full[5:15:2]


def _noisy_mapper(record):
    # an augmentation-like draw from numpy's global RNG
    return {"id": record["id"], "noise": float(np.random.rand())}


def test_loader_batches_do_not_depend_on_workers_or_resume_point():
    records = [{"id": i, "file_name": f"{i}.png"} for i in range(7)]

    def batches(workers, start=0, n=5):
        loader = ResumableTrainLoader(
            records, _noisy_mapper, total_batch_size=3, num_workers=workers, seed=5
        )
        loader.start_at(start)
        return _take(iter(loader), n)

    straight = batches(0)
    assert batches(2) == straight
    assert batches(1, start=2, n=3) == straight[2:]
    assert len({x["noise"] for b in straight for x in b}) == 15
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    batches(0)  # iterating never draws from the training RNG
    assert torch.equal(torch.rand(1), before)


# ------------------------------------------------------------------- errors of other processes
def _unreadable(_):
    raise ValueError("cannot read image /data/x.png: broken")


def test_worker_error_is_reported_by_its_innermost_exception():
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(2)), num_workers=1, collate_fn=_unreadable
    )
    with pytest.raises(ValueError) as err:
        next(iter(loader))
    remote = remote_error(err.value)
    assert remote.type_name == "ValueError" and remote.where == os.path.abspath(__file__)
    assert one_line_error(err.value) == "ValueError: cannot read image /data/x.png: broken"
    assert is_user_error(err.value, scripts=(__file__,))
    assert not is_user_error(err.value)  # raised outside c2s-d2: a bug, keeps its traceback


def test_launch_child_error_is_reported_by_its_innermost_exception():
    from torch.multiprocessing.spawn import ProcessRaisedException

    trace = (
        "Traceback (most recent call last):\n"
        '  File "/x/torch/multiprocessing/spawn.py", line 90, in _wrap\n    fn(i, *args)\n'
        '  File "/repo/c2s_d2/data/zero_shot.py", line 140, in list_image_label_pairs\n'
        "    raise DatasetNotPreparedError(\n"
        "c2s_d2.data.zero_shot.DatasetNotPreparedError: label not found for image /d/1.png\n"
    )
    e = ProcessRaisedException(
        "\n\n-- Process 1 terminated with the following error:\n" + trace, 1, 7
    )
    assert is_user_error(e)
    assert one_line_error(e) == "DatasetNotPreparedError: label not found for image /d/1.png"
    bug = trace.replace("c2s_d2.data.zero_shot.DatasetNotPreparedError", "TypeError")
    assert not is_user_error(ProcessRaisedException(bug, 1, 7))


def test_non_finite_losses_names_each_term():
    losses = {
        "loss_ce": torch.tensor(1.0),
        "loss_dice": torch.tensor(float("nan")),
        "loss_mask_0": torch.tensor(-float("inf")),
        "loss_mask": torch.tensor(float("inf")),
    }
    expected = ["loss_dice is nan", "loss_mask_0 is -inf", "loss_mask is inf"]
    assert non_finite_losses(losses) == expected
    assert non_finite_losses({"loss_ce": torch.tensor(2.0)}) == []


# ------------------------------------------------------------------------- through train_net
def test_nan_loss_stops_training_with_one_line(world, tmp_path, monkeypatch):
    import train_net
    from detectron2.engine import HookBase

    class InjectNaN(HookBase):
        """From iteration 2 on, the model returns a NaN Dice loss."""

        def before_train(self):
            def poison(module, inputs, output):
                if module.training and self.trainer.iter >= 2:
                    return {**output, "loss_dice": output["loss_dice"] * float("nan")}

            self.trainer.model.register_forward_hook(poison, prepend=True)

    build_hooks = train_net.Trainer.build_hooks
    with_nan = lambda self: build_hooks(self) + [InjectNaN()]  # noqa: E731
    monkeypatch.setattr(train_net.Trainer, "build_hooks", with_nan)
    out = tmp_path / "out"
    message = train_net_in_process(
        ["--config-file", BASELINE, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2",
         "OUTPUT_DIR", str(out), *TINY]
    )  # fmt: skip
    assert message == (
        "train_net.py: error: NonFiniteError: loss_dice is nan at iteration 2; training stopped "
        f"before the weight update (last checkpoint: {out / 'model_0000001.pth'})"
    )
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["model_0000001.pth"]
    state = torch.load(out / "model_0000001.pth", weights_only=True)
    assert state["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    remove_checkpoints(out)


def test_resume_from_midway_checkpoint_is_exact(world, tmp_path):
    """Fast variant of the SIGKILL test (slow file): 3 iterations straight, and 2 + 1: resumed
    from a copy of the checkpoint written after 2 iterations, in a fresh output folder."""
    common = ["--config-file", BASELINE, "--deterministic", "SOLVER.MAX_ITER", "3",
              "SOLVER.CHECKPOINT_PERIOD", "2", *TINY, *LEARN]  # fmt: skip
    # (options before the KEY VALUE overrides, which take the rest of the command line)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = train_net_subprocess([*common, "OUTPUT_DIR", str(straight)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed.mkdir()
    shutil.copy(straight / "model_0000001.pth", resumed)
    (resumed / "last_checkpoint").write_text("model_0000001.pth")
    proc = train_net_subprocess(["--resume", *common, "OUTPUT_DIR", str(resumed)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting training from iteration 2" in proc.stdout
    assert differing_weights(straight / "model_final.pth", resumed / "model_final.pth") == []
    assert (straight / METRICS).read_text() == (resumed / METRICS).read_text()
    # and training did move the weights in between
    assert differing_weights(straight / "model_0000001.pth", straight / "model_final.pth") != []
    remove_checkpoints(straight, resumed)


# ----------------------------------------------------------------------------------- bad input
def corrupt_world(src: str, dst: str, case: str) -> str:
    """A copy of the mini-world at ``src`` (its ``miniworld`` folder's parent) with one kind of
    bad input in its training split; returns the new DETECTRON2_DATASETS root."""
    from PIL import Image

    shutil.copytree(os.path.join(src, "miniworld"), os.path.join(dst, "miniworld"))
    images = os.path.join(dst, "miniworld", "images", "train")
    labels = os.path.join(dst, "miniworld", "labels", "train")
    for name in sorted(os.listdir(images)):  # every file: the first batch meets one
        if case == "image without label" and name == "000003.png":
            os.remove(os.path.join(labels, name))
        elif case == "unreadable image":
            with open(os.path.join(images, name), "wb") as f:
                f.write(b"not a png")
        elif case == "label ids outside the class range":
            Image.fromarray(np.full((64, 64), 200, np.uint8)).save(os.path.join(labels, name))
        elif case == "image/label size mismatch":
            path = os.path.join(labels, name)
            Image.open(path).resize((32, 32), Image.NEAREST).save(path)
    return dst


E = "train_net.py: error: "
# bad training data -> the exact last line ({data}: the corrupted DETECTRON2_DATASETS)
DATA_CASES = {
    "image without label": E + "DatasetNotPreparedError: label not found for image "
    "{data}/miniworld/images/train/000003.png: {data}/miniworld/labels/train/000003.png "
    "(generated by c2s_d2.data.miniworld.ensure_miniworld)",
    "unreadable image": E + "ValueError: cannot read image {data}/miniworld/images/train/NNNNNN.png"
    ": cannot identify image file <_io.BufferedReader "
    "name='{data}/miniworld/images/train/NNNNNN.png'>",
    "label ids outside the class range": E + "ValueError: {data}/miniworld/labels/train/NNNNNN.png"
    ": label ids [200] outside the class range 0..15 (or 255)",
    "image/label size mismatch": E + "ValueError: image/label size mismatch: "
    "{data}/miniworld/images/train/NNNNNN.png is 64x64, "
    "{data}/miniworld/labels/train/NNNNNN.png is 32x32",
}  # NNNNNN: the first image of the resumed data order


def matches(message: str, template: str, **fields) -> bool:
    """``message`` is ``template`` with ``fields`` filled in and NNNNNN one image number."""
    pattern = re.escape(template.format(**fields)).replace("NNNNNN", r"(\d{6})")
    found = re.fullmatch(pattern, message)
    return found is not None and len(set(found.groups())) <= 1


# other bad input -> (train_net arguments, the exact last line); {tmp}: the test's folder,
# {datasets}: an empty DETECTRON2_DATASETS
OTHER_CASES = {
    "unknown config key": (
        ["MODEL.NOT_A_KEY", "1"],
        E + "AssertionError: Non-existent key: MODEL.NOT_A_KEY",
    ),
    "output folder not writable": (
        ["OUTPUT_DIR", "{tmp}/a_file/out"],
        E + "NotADirectoryError: [Errno 20] Not a directory: '{tmp}/a_file/out'",
    ),
    "dataset not registered": (
        ["DATASETS.TRAIN", "('nope_train',)"],
        E + "KeyError: dataset 'nope_train' has no 'stuff_classes' in its metadata (is it "
        "registered? see c2s_d2/data/datasets/)",
    ),
    "missing dataset folder": (
        ["DATASETS.TRAIN", "('c2s_voc_train',)", "DATASETS.TEST", "('c2s_voc_val',)"],
        E + "DatasetNotPreparedError: split list not found: {datasets}/VOCdevkit/VOC2012/"
        "annotations_detectron2/train_aug.txt (run: python datasets/prepare_voc.py --root "
        "{datasets})",
    ),
    "missing weights file": (
        ["--eval-only", "MODEL.WEIGHTS", "/nonexistent.pth"],
        E + "FileNotFoundError: checkpoint file not found: /nonexistent.pth",
    ),
    "missing teacher weights": (
        ["--config-file", C2S_FULL, "MODEL.CLIP.PRETRAINED", "/nonexistent.pt"],
        E + "FileNotFoundError: CLIP checkpoint file not found: /nonexistent.pt",
    ),
    "deterministic without a seed": (
        ["--deterministic", "SEED", "-1"],
        E + "ValueError: --deterministic needs SEED >= 0, got SEED -1",
    ),
}


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """OUTPUT_DIR of a one-iteration run: model_final.pth (iteration 0) and last_checkpoint."""
    out = tmp_path_factory.mktemp("trained")
    message = train_net_in_process(
        ["--config-file", BASELINE, "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(out), *TINY]
    )
    assert message == ""
    yield out
    remove_checkpoints(out)


def _argv(extra, out, config=BASELINE):
    # options first: the KEY VALUE overrides take the rest of the command line
    options = [x for x in extra if x.startswith("--") or x.endswith(".yaml")]
    if "--config-file" not in options:
        options = ["--config-file", config, *options]
    overrides = [x for x in extra if x not in options]
    return [*options, "OUTPUT_DIR", str(out), *TINY, *overrides]


@pytest.mark.parametrize("case", sorted(OTHER_CASES))
def test_bad_input_one_line(world, tmp_path, monkeypatch, case):
    extra, expected = OTHER_CASES[case]
    (tmp_path / "a_file").write_text("a regular file")
    empty = tmp_path / "no_datasets"
    if case == "missing dataset folder":
        monkeypatch.setenv("DETECTRON2_DATASETS", str(empty))
    extra = [x.replace("{tmp}", str(tmp_path)) for x in extra]
    message = train_net_in_process(_argv(extra, tmp_path / "out"))
    assert message == expected.format(tmp=tmp_path, datasets=empty)


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_one_line_and_nothing_saved_is_lost(world, trained, tmp_path, monkeypatch, case):
    data = corrupt_world(os.environ["DETECTRON2_DATASETS"], str(tmp_path / "datasets"), case)
    monkeypatch.setenv("DETECTRON2_DATASETS", data)
    out = tmp_path / "out"
    # hard links, not 140 MB copies; a file changed in place or replaced changes its digest
    shutil.copytree(trained, out, copy_function=os.link)
    before = {f: digest(out / f) for f in os.listdir(out) if f.endswith(".pth")}
    before["last_checkpoint"] = digest(out / "last_checkpoint")
    message = train_net_in_process(["--resume", *_argv(["SOLVER.MAX_ITER", "3"], out)])
    assert matches(message, DATA_CASES[case], data=data), message
    after = {f: digest(out / f) for f in os.listdir(out) if f.endswith(".pth")}
    after["last_checkpoint"] = digest(out / "last_checkpoint")
    assert after == before
    remove_checkpoints(out)


def test_checkpoint_of_another_architecture(trained, tmp_path):
    weights = trained / "model_final.pth"
    message = train_net_in_process(
        _argv(
            ["--eval-only", "MODEL.WEIGHTS", str(weights), "MODEL.C2S.HIDDEN_DIM", "32"], tmp_path
        )
    )
    assert message.startswith(
        f"{E}ValueError: checkpoint {weights} does not fit the model (another architecture or "
        "config?): 47 tensors have other shapes: query_decoder.object_feat.weight (8, 64) in the "
        "file vs (8, 32) in the model, "
    )


def test_truncated_last_checkpoint_on_resume(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out, copy_function=os.link)
    data = (out / "model_final.pth").read_bytes()
    (out / "model_final.pth").unlink()  # a hard link to the fixture's file: do not write into it
    (out / "model_final.pth").write_bytes(data[:1000])
    message = train_net_in_process(["--resume", *_argv(["SOLVER.MAX_ITER", "3"], out)])
    assert message.startswith(
        f"{E}ValueError: cannot read checkpoint {out / 'model_final.pth'} (truncated, corrupt or "
        "not a checkpoint file): RuntimeError: PytorchStreamReader failed"
    ), message
