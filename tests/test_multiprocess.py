"""Multi-process correctness: every trainable parameter gets a gradient in every config (DDP is
built without ``find_unused_parameters``), and a non-finite loss or matching cost on one process
stops every process with the same one-line message (2 CPU processes, gloo, detectron2's launch).
"""

import multiprocessing
import os
import threading
from datetime import timedelta
from typing import List

import pytest
import torch

from c2s_d2.engine.hooks import non_finite_stop_message
from c2s_d2.modeling.matcher import HungarianMatcher
from c2s_d2.utils.errors import NonFiniteError, one_line_error
from test_reliability import (  # noqa: F401  (world: fixture)
    BASELINE,
    C2S_FAST,
    C2S_FULL,
    TINY,
    remove_checkpoints,
    world,
)

G1 = ["MODEL.C2S.NUM_GLOBAL_QUERIES", "1"]
GLOBAL_OFF = [*C2S_FAST, *G1, "MODEL.C2S.DISTILL.GLOBAL.ENABLED", "False"]
K = "MODEL.C2S."

# name -> (config file, overrides, CLS queries built?); TINY is added to all
GRAD_CONFIGS = {
    "baseline": (BASELINE, [], False),
    "baseline, NUM_GLOBAL_QUERIES 1": (BASELINE, G1, False),
    "full C2S": (C2S_FULL, C2S_FAST, True),
    "full, DISTILL.ENABLED False": (C2S_FULL, [*C2S_FAST, K + "DISTILL.ENABLED", "False"], False),
    "full, GLOBAL.ENABLED False": (C2S_FULL, GLOBAL_OFF, False),
    "full, GLOBAL.WEIGHT 0": (C2S_FULL, [*C2S_FAST, K + "DISTILL.GLOBAL.WEIGHT", "0.0"], False),
    "full, LOCAL off": (C2S_FULL, [*C2S_FAST, K + "DISTILL.LOCAL.ENABLED", "False"], True),
    "full, LATENT off": (C2S_FULL, [*C2S_FAST, K + "DISTILL.LATENT.ENABLED", "False"], True),
    "full, local on ground truth only": (
        C2S_FULL,
        [*C2S_FAST, K + "DISTILL.LATENT.ENABLED", "False", K + "DISTILL.LOCAL.USE_PSEUDO_MASKS",
         "False"],
        True,
    ),  # fmt: skip
    "full, DEEP_SUPERVISION False": (C2S_FULL, [*C2S_FAST, K + "DEEP_SUPERVISION", "False"], True),
    "full, INFERENCE_MODE teacher_dense": (
        C2S_FULL,
        [*C2S_FAST, K + "INFERENCE_MODE", "teacher_dense"],
        True,
    ),
    "baseline, learnable logit scale": (
        BASELINE,
        [K + "CLASSIFIER.LEARNABLE_LOGIT_SCALE", "True"],
        False,
    ),
    # one decoder layer reads one memory level: the other levels' projections are not built
    "baseline, DEC_LAYERS 1, input projections": (
        BASELINE,
        [K + "DEC_LAYERS", "1", K + "ENFORCE_INPUT_PROJ", "True", K + "PRE_NORM", "True"],
        False,
    ),
    "baseline, point-sampled losses": (BASELINE, [K + "TRAIN_NUM_POINTS", "64"], False),
    "baseline, backbone without res5": (
        BASELINE,
        ["MODEL.RESNETS.OUT_FEATURES", "['res2','res3','res4']",
         K + "PIXEL_DECODER.IN_FEATURES", "['res2','res3','res4']"],
        False,
    ),  # fmt: skip
}


def build(config: str, overrides: List[str]):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from c2s_d2 import add_c2s_config

    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list([*TINY, *overrides])
    return cfg, build_model(cfg)


# --------------------------------------------------------------------- no unused parameters
@pytest.mark.parametrize("name", list(GRAD_CONFIGS))
def test_every_trainable_parameter_gets_a_gradient(world, name):  # noqa: F811
    from detectron2.data import DatasetCatalog

    from c2s_d2.data import C2SSemanticDatasetMapper

    config, overrides, with_cls = GRAD_CONFIGS[name]
    torch.manual_seed(0)
    cfg, model = build(config, overrides)
    assert hasattr(model.query_decoder, "global_feat") == with_cls
    model.train()
    mapper = C2SSemanticDatasetMapper(cfg, True)
    batch = [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:2]]
    losses = model(batch)
    sum(losses.values()).backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 50
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize("name", ["full C2S", "baseline, point-sampled losses"])
def test_gradients_do_not_depend_on_the_data(world, name):  # noqa: F811
    """Under DDP a process may get a batch without any labelled segment (all pixels ignored):
    every parameter must still get a gradient (else find_unused_parameters would be needed)."""
    from detectron2.data import DatasetCatalog

    from c2s_d2.data import C2SSemanticDatasetMapper

    config, overrides, _ = GRAD_CONFIGS[name]
    torch.manual_seed(0)
    cfg, model = build(config, overrides)
    model.train()
    mapper = C2SSemanticDatasetMapper(cfg, True)
    batch = [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:2]]
    for x in batch:
        x["instances"] = x["instances"][:0]
        x["sem_seg"] = torch.full_like(x["sem_seg"], 255)
    losses = model(batch)
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([K + "DEC_LAYERS", "0"], "MODEL.C2S.DEC_LAYERS must be >= 1, got 0"),
        (
            [K + "PIXEL_DECODER.IN_FEATURES", "['res2','res3','res4']"],
            "backbone features ['res5'] feed nothing (MODEL.C2S.PIXEL_DECODER.IN_FEATURES is "
            "['res2', 'res3', 'res4']): remove them from the backbone's MODEL.RESNETS.OUT_FEATURES",
        ),
    ],
)
def test_configs_that_would_leave_parameters_untrained_are_refused(world, overrides, message):
    with pytest.raises(ValueError) as err:
        build(BASELINE, overrides)
    assert str(err.value) == message


# ------------------------------------------------------------------- non-finite matching cost
def test_matcher_raises_or_defers_a_non_finite_cost():
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=1.0, cost_dice=1.0, num_points=0)
    # 2 queries, 1 target: query 0 predicts NaN, so only query 1 can be matched sensibly
    outputs = {
        "pred_logits": torch.tensor([[[float("nan"), 0.0], [2.0, 0.0]]]),
        "pred_masks": torch.zeros(1, 2, 2, 2),
    }
    targets = [{"labels": torch.tensor([0]), "masks": torch.ones(1, 2, 2, dtype=torch.bool)}]
    with pytest.raises(NonFiniteError) as err:
        matcher(outputs, targets)
    assert str(err.value) == (
        "HungarianMatcher: non-finite matching cost (image 0: NaN/inf in pred_logits or "
        "pred_masks)"
    )
    matcher.defer_non_finite = True
    (rows, cols), *_ = matcher(outputs, targets)
    assert rows.tolist() == [1] and cols.tolist() == [0]
    assert matcher.non_finite_reports == ["image 0: NaN/inf in pred_logits or pred_masks"]
    masks = torch.zeros(2, 2, 2)
    masks[1, 0, 0] = float("inf")  # query 1 is the bad one here, query 0 is taken
    rows, cols = matcher.match_by_mask_cost(masks, torch.ones(1, 2, 2), torch.tensor([True, True]))
    assert rows.tolist() == [0] and cols.tolist() == [0]
    assert matcher.non_finite_reports[-1] == "pseudo-mask regions: NaN/inf in pred_masks"


def test_stop_message_names_terms_processes_and_iteration():
    tail = "; training stopped before the weight update (last checkpoint: /o/model_0000004.pth)"
    last = "/o/model_0000004.pth"
    assert non_finite_stop_message(5, [(["loss_dice is nan"], [])], last) == (
        "loss_dice is nan at iteration 5" + tail
    )
    two = [([], []), (["loss_dice is nan", "loss_ce is inf"], [])]
    assert non_finite_stop_message(5, two, last) == (
        "loss_dice is nan in process 1, loss_ce is inf in process 1 at iteration 5" + tail
    )
    # matching faults win over the losses they cause; deep-supervision repeats count once
    costs = [(["loss_ce is nan"], ["image 1: x", "image 1: x", "image 0: x"]), ([], ["image 0: x"])]
    assert non_finite_stop_message(3, costs, last) == (
        "non-finite matching cost at iteration 3 (process 0, image 1: x; 2 more)" + tail
    )
    assert non_finite_stop_message(3, [([], ["image 0: x"])], "none") == (
        "non-finite matching cost at iteration 3 (image 0: x); training stopped before the "
        "weight update (last checkpoint: none)"
    )


# ------------------------------------------------------------------ two processes (gloo, CPU)
FAULT_AT = 2  # iterations 0 and 1 train normally (DDP fails at the second step, iteration 1)


def _inject_fault(fault: str) -> None:
    """Process 1 only: a NaN loss_dice, or a NaN matching cost, at iteration FAULT_AT."""
    from c2s_d2.modeling.meta_arch import C2SSegmentor

    step = {"i": -1}
    training_losses = C2SSegmentor._training_losses
    mask_costs = HungarianMatcher.mask_costs

    def counted(self, *args, **kwargs):
        step["i"] += 1
        losses = training_losses(self, *args, **kwargs)
        if fault == "loss" and step["i"] == FAULT_AT:
            losses["loss_dice"] = losses["loss_dice"] * float("nan")
        return losses

    def nan_cost(self, *args, **kwargs):
        ce, dice = mask_costs(self, *args, **kwargs)
        if fault == "matching" and step["i"] == FAULT_AT and not step.get("done"):
            step["done"] = True  # the first matching of the step only: one fault to name
            ce = ce.clone()
            ce[0, 0] = float("nan")
        return ce, dice

    C2SSegmentor._training_losses = counted
    HungarianMatcher.mask_costs = nan_cost


def _worker(argv: List[str], fault: str, report_dir: str) -> None:
    """One of the processes: train_net's main, the fault injected in process 1; writes what
    ended it to ``report_dir/rank<r>.txt``."""
    import train_net
    from detectron2.utils import comm

    rank = comm.get_rank()
    if fault and rank == 1:
        _inject_fault(fault)
    result = "finished"
    try:
        train_net.main(train_net.argument_parser().parse_args(argv))
    except Exception as e:
        result = one_line_error(e)
        raise
    finally:
        with open(os.path.join(report_dir, f"rank{rank}.txt"), "w") as f:
            f.write(result)
        # launch terminates the other processes as soon as one has failed: let each write first
        # (a process that never gets here fails this barrier, naming itself, after 60 s)
        torch.distributed.monitored_barrier(timeout=timedelta(seconds=60))


def run_two_processes(argv: List[str], fault: str, report_dir, timeout: float = 300):
    """Train through detectron2's launch with 2 processes (gloo on CPU), ``fault`` injected in
    process 1. Returns (the launch error as train_net.py prints it, or "", {rank: what ended
    it}); on a hang, kills the processes and fails."""
    from detectron2.engine import launch

    outcome = {}

    def target():
        try:
            # a collective that waits longer than this fails instead of hanging
            launch(_worker, 2, dist_url="auto", args=(argv, fault, str(report_dir)),
                   timeout=timedelta(seconds=120))  # fmt: skip
            outcome["error"] = ""
        except Exception as e:
            outcome["error"] = one_line_error(e)

    runner = threading.Thread(target=target, daemon=True)
    runner.start()
    runner.join(timeout)
    if runner.is_alive():
        for process in multiprocessing.active_children():  # the two workers started above
            process.kill()
        runner.join(60)
        raise AssertionError(f"2-process run still running after {timeout} s: a hang")
    reports = {}
    for r in (0, 1):
        path = os.path.join(report_dir, f"rank{r}.txt")
        if os.path.exists(path):
            with open(path) as f:
                reports[r] = f.read()
    return outcome["error"], reports


def _argv(out, extra=()) -> List[str]:
    return ["--config-file", C2S_FULL, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2",
            "OUTPUT_DIR", str(out), *TINY, *GLOBAL_OFF, *extra]  # fmt: skip


def test_two_processes_nan_loss_on_one_stops_both(world, tmp_path):  # noqa: F811
    """Also the unused-parameter regression: CLS queries configured, global distillation off;
    two full steps pass under DDP before the NaN."""
    out = tmp_path / "out"
    error, reports = run_two_processes(_argv(out), "loss", tmp_path)
    expected = (
        "NonFiniteError: loss_dice is nan in process 1 at iteration 2; training stopped before "
        f"the weight update (last checkpoint: {out / 'model_0000001.pth'})"
    )
    assert reports == {0: expected, 1: expected}
    assert error == expected  # what train_net.py prints after "train_net.py: error: "
    remove_checkpoints(out)


@pytest.mark.slow
def test_two_processes_nan_matching_cost_on_one_stops_both(world, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    error, reports = run_two_processes(_argv(out), "matching", tmp_path)
    expected = (
        "NonFiniteError: non-finite matching cost at iteration 2 (process 1, image 0: NaN/inf in "
        "pred_logits or pred_masks); training stopped before the weight update (last "
        f"checkpoint: {out / 'model_0000001.pth'})"
    )
    assert reports == {0: expected, 1: expected}
    assert error == expected  # what train_net.py prints after "train_net.py: error: "
    remove_checkpoints(out)


@pytest.mark.slow
def test_two_processes_train_with_cls_queries_and_global_distillation_off(world, tmp_path):
    out = tmp_path / "out"
    error, reports = run_two_processes(_argv(out, ["SOLVER.MAX_ITER", "3"]), "", tmp_path)
    assert error == "" and reports == {0: "finished", 1: "finished"}
    state = torch.load(out / "model_final.pth", weights_only=True)
    assert state["iteration"] == 2
    assert not any(k.startswith("query_decoder.global_") for k in state["model"])
    remove_checkpoints(out)
