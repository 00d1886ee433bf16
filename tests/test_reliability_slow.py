"""Reliability (slow part; ``make test-slow``): runs killed with SIGKILL and resumed reproduce an
uninterrupted run bit for bit (zero-shot baseline and full C2S), a kill in the middle of a save,
CPU multi-process training and evaluation, and every bad input through the real entry points."""

import json
import os

import matplotlib.cbook
import numpy as np
import pytest

from test_reliability import (
    BASELINE,
    C2S_FAST,
    C2S_FULL,
    DATA_CASES,
    LEARN,
    METRICS,
    OTHER_CASES,
    ROOT,
    TINY,
    corrupt_world,
    differing_weights,
    last_line,
    matches,
    remove_checkpoints,
    subprocess_env,
    train_net_subprocess,
    world,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.slow

CONFIGS = {"baseline": (BASELINE, []), "c2s_full": (C2S_FULL, C2S_FAST)}
RUN = ["--deterministic", "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3", *LEARN]

# A train_net.py that patches the library, then runs the real entry point as __main__.
KILL_AFTER_CHECKPOINT = """
import os, runpy, signal, sys
import c2s_d2.engine.hooks as hooks
after_step = hooks.PeriodicCheckpointHook.after_step
def killed_after_checkpoint(self):
    after_step(self)
    if self.trainer.iter == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
hooks.PeriodicCheckpointHook.after_step = killed_after_checkpoint
sys.argv = ["train_net.py"] + sys.argv[1:]
runpy.run_path("train_net.py", run_name="__main__")
"""
KILL_DURING_SAVE = """
import io, os, runpy, signal, sys, torch
save, calls = torch.save, []
def killed_half_way(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) < int(os.environ["KILL_AT_SAVE"]):
        return save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    save(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = killed_half_way
sys.argv = ["train_net.py"] + sys.argv[1:]
runpy.run_path("train_net.py", run_name="__main__")
"""


def script(tmp_path, text: str) -> str:
    path = tmp_path / "train_net_patched.py"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):  # noqa: F811
    """Uninterrupted 6-iteration runs of both configs (no loader workers)."""
    outs = {}
    for name, (config, extra) in CONFIGS.items():
        out = tmp_path_factory.mktemp(f"straight_{name}")
        proc = train_net_subprocess(
            ["--config-file", config, *RUN, "OUTPUT_DIR", str(out), *TINY, *extra]
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = out
    yield outs
    remove_checkpoints(*outs.values())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sigkill_then_resume_equals_uninterrupted_run(straight, tmp_path, name):
    config, extra = CONFIGS[name]
    out = tmp_path / "out"
    # one loader worker here, none in the straight run: the data order must not care
    args = ["--config-file", config, *RUN, "OUTPUT_DIR", str(out), *TINY, *extra,
            "DATALOADER.NUM_WORKERS", "1"]  # fmt: skip
    env = subprocess_env(KILL_AT="2")
    proc = train_net_subprocess(args, env, script(tmp_path, KILL_AFTER_CHECKPOINT))
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL, right after the checkpoint
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    assert not (out / "model_final.pth").exists()
    proc = train_net_subprocess(["--resume", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting training from iteration 3" in proc.stdout
    assert differing_weights(straight[name] / "model_final.pth", out / "model_final.pth") == []
    assert (straight[name] / METRICS).read_text() == (out / METRICS).read_text()
    if name == "c2s_full":  # the latent memory (a buffer) took part and was restored
        import torch

        state = torch.load(out / "model_final.pth", weights_only=True)["model"]
        assert int(state["distiller.latent_memory.counts"].sum()) > 0
    remove_checkpoints(out)


def test_sigkill_during_save_keeps_last_good_checkpoint(straight, tmp_path):
    out = tmp_path / "out"
    args = ["--config-file", BASELINE, *RUN, "OUTPUT_DIR", str(out), *TINY]
    # saves: model_0000002 (1st), model_0000005 (2nd, killed half-way)
    env = subprocess_env(KILL_AT_SAVE="2")
    proc = train_net_subprocess(args, env, script(tmp_path, KILL_DURING_SAVE))
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    torn, *kept = sorted(f for f in os.listdir(out) if ".pth" in f)
    assert kept == ["model_0000002.pth"]
    # the torn write, under a name nothing reads (.<name>.<pid>.<random>.tmp)
    assert torn.startswith(".model_0000005.pth.") and torn.endswith(".tmp"), torn
    proc = train_net_subprocess(["--resume", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        differing_weights(straight["baseline"] / "model_final.pth", out / "model_final.pth") == []
    )
    remove_checkpoints(out)


# ------------------------------------------------------------------------------ multi-process
def test_two_processes_train_and_evaluate_like_one(straight, tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1")
    out = tmp_path / "train2"
    proc = train_net_subprocess(
        ["--config-file", BASELINE, "--num-gpus", "2", "--dist-url", "auto", "SOLVER.MAX_ITER",
         "2", "OUTPUT_DIR", str(out), *TINY, *LEARN],
        env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model_final.pth").exists() and (out / "log.txt.rank1").exists()
    assert "[c2s_miniworld_val] mIoU" in proc.stdout

    weights = str(straight["baseline"] / "model_final.pth")
    outputs = {}
    for n in ("1", "2"):
        outputs[n] = tmp_path / f"eval{n}"
        proc = train_net_subprocess(
            ["--config-file", BASELINE, "--eval-only", "--num-gpus", n, "--dist-url", "auto",
             "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(outputs[n]), *TINY],
            env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"on {n} devices" in proc.stdout
    one, two = (json.loads((outputs[n] / METRICS).read_text()) for n in ("1", "2"))
    assert one == two and one["pAcc"] > 0
    conf = [np.load(outputs[n] / os.path.dirname(METRICS) / "sem_seg_confusion.npy") for n in "12"]
    assert np.array_equal(conf[0], conf[1])
    assert conf[0].sum() > 0
    remove_checkpoints(out)


def test_user_error_in_a_child_process_is_one_line(world, tmp_path):  # noqa: F811
    data = corrupt_world(os.environ["DETECTRON2_DATASETS"], str(tmp_path / "d"), "unreadable image")
    env = subprocess_env(DETECTRON2_DATASETS=data, OMP_NUM_THREADS="1")
    proc = train_net_subprocess(
        ["--config-file", BASELINE, "--num-gpus", "2", "--dist-url", "auto", "SOLVER.MAX_ITER",
         "2", "OUTPUT_DIR", str(tmp_path / "out"), *TINY, "DATALOADER.NUM_WORKERS", "1"],
        env,
    )  # fmt: skip
    assert proc.returncode == 1
    assert matches(last_line(proc.stderr), DATA_CASES["unreadable image"], data=data), proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------- bad input through the real entry points
@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_through_train_net(world, tmp_path, case):  # noqa: F811
    data = corrupt_world(os.environ["DETECTRON2_DATASETS"], str(tmp_path / "d"), case)
    # a loader worker process reads the data: its error must still end in one line
    proc = train_net_subprocess(
        ["--config-file", BASELINE, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path / "out"),
         *TINY, "DATALOADER.NUM_WORKERS", "1"],
        subprocess_env(DETECTRON2_DATASETS=data),
    )  # fmt: skip
    assert proc.returncode == 1
    assert matches(last_line(proc.stderr), DATA_CASES[case], data=data), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", sorted(OTHER_CASES))
def test_bad_input_through_train_net(world, tmp_path, case):  # noqa: F811
    extra, expected = OTHER_CASES[case]
    (tmp_path / "a_file").write_text("a regular file")
    empty = tmp_path / "no_datasets"
    env = subprocess_env()
    if case == "missing dataset folder":
        env["DETECTRON2_DATASETS"] = str(empty)
    extra = [x.replace("{tmp}", str(tmp_path)) for x in extra]
    options = [x for x in extra if x.startswith("--") or x.endswith(".yaml")]
    if "--config-file" not in options:
        options = ["--config-file", BASELINE, *options]
    overrides = [x for x in extra if x not in options]
    proc = train_net_subprocess(
        [*options, "OUTPUT_DIR", str(tmp_path / "out"), *TINY, *overrides], env
    )
    assert proc.returncode == 1
    assert last_line(proc.stderr) == expected.format(tmp=tmp_path, datasets=empty)
    assert "Traceback" not in proc.stderr


DEMO_CASES = {
    "empty vocabulary": (
        ["--vocabulary", " , "],
        "demo.py: error: ValueError: --vocabulary ' , ': empty class name (give e.g. "
        "'cat,dog,grass')",
    ),
    "duplicate vocabulary": (
        ["--vocabulary", "cat,Cat"],
        "demo.py: error: ValueError: --vocabulary: duplicate class names ['cat']",
    ),
    "unregistered --dataset": (
        ["--dataset", "nope_val"],
        "demo.py: error: KeyError: dataset 'nope_val' has no 'stuff_classes' in its metadata (is "
        "it registered? see c2s_d2/data/datasets/)",
    ),
}


@pytest.mark.parametrize("case", sorted(DEMO_CASES))
def test_bad_input_through_demo(world, tmp_path, case):  # noqa: F811
    extra, expected = DEMO_CASES[case]
    photo = str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    argv = ["--config-file", BASELINE, "--input", photo, "--output", str(tmp_path / "o"), *extra,
            "--opts", *TINY]  # fmt: skip
    proc = train_net_subprocess(argv, script=os.path.join(ROOT, "demo", "demo.py"))
    assert proc.returncode == 2
    assert last_line(proc.stderr) == expected
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "o" / "grace_hopper.png")
