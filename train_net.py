#!/usr/bin/env python
"""Train and evaluate c2s-d2 models with Detectron2.

python train_net.py --config-file configs/miniworld/zs_baseline_R18_bs8_1k.yaml MODEL.DEVICE cpu
python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <checkpoint>
python train_net.py --config-file <cfg> --num-gpus 8
python train_net.py --config-file <cfg> --resume        # continue exactly where a run stopped

Bad input (config, weights, data, a busy or full output folder) ends the command with one line on
stderr naming the file, key or value, before anything saved is changed; --verbose adds the
traceback, which OUTPUT_DIR/log.txt always gets once the run has started writing there.
"""

import logging
import math
import os
import re
import sys
import traceback
from collections import OrderedDict

import detectron2.utils.comm as comm
import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.data import build_detection_test_loader
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from c2s_d2 import add_c2s_config
from c2s_d2.config import inference_cfg
from c2s_d2.data import C2SSemanticDatasetMapper
from c2s_d2.engine import (
    C2SCheckpointer,
    ReliableTrainer,
    build_resumable_train_loader,
    enable_deterministic_mode,
)
from c2s_d2.data.datasets.custom import check_env_datasets
from c2s_d2.engine.checkpoint import TAG_FILE, OutputDirLock, atomic_write, fetch_weights
from c2s_d2.evaluation import C2SSemSegEvaluator, format_headline, format_results_table
from c2s_d2.solver import build_c2s_lr_scheduler, build_c2s_optimizer
from c2s_d2.utils.errors import is_user_error, one_line_error


class Trainer(ReliableTrainer):
    """Crash-safe, exactly resumable trainer (c2s_d2/engine) with the zero-shot mapper, evaluator,
    optimiser and per-dataset vocabulary."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return C2SSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_resumable_train_loader(cfg, C2SSemanticDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # detectron2's test inputs, with unreadable files and size mismatches named
        mapper = C2SSemanticDatasetMapper(cfg, False)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_c2s_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_c2s_lr_scheduler(cfg, optimizer)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate on every test set, with that set's classes as the vocabulary."""
        core = model.module if isinstance(model, DistributedDataParallel) else model
        results = OrderedDict()
        for idx, name in enumerate(cfg.DATASETS.TEST):
            core.set_vocabulary_from_dataset(name)
            loader = cls.build_test_loader(cfg, name)
            evaluator = evaluators[idx] if evaluators else cls.build_evaluator(cfg, name)
            results[name] = inference_on_dataset(model, loader, evaluator)
            if comm.is_main_process():
                print_csv_format(results[name])
                print(f"[{name}] {format_headline(results[name])}", flush=True)
        if len(results) > 1 and comm.is_main_process():
            table = format_results_table(results)
            print(f"Summary over {len(results)} datasets:\n{table}", flush=True)
        return results[cfg.DATASETS.TEST[0]] if len(results) == 1 else results


# ------------------------------------------------------------------------------ the config
def _check_yaml(path: str, named_in: str = "") -> None:
    """``path`` and its ``_BASE_`` files must be readable YAML mappings (detectron2 fails on the
    others with a traceback); the error names the file, line and column."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        what = f"_BASE_ config file not found: {path} (named in {named_in})" if named_in else ""
        raise FileNotFoundError(what or f"config file not found: {path}") from None
    except yaml.constructor.ConstructorError:
        return  # a python tag: detectron2 reads such files unsafely, leave them to it
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = " ".join(f"{e.context or ''} {e.problem or ''}".split())
        raise ValueError(f"config file {path}{where}: invalid YAML: {reason}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path}: invalid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        raise ValueError(f"config file {path} is empty")
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {path}: expected KEY: value lines, got a YAML {type(data).__name__}"
        )
    bases = data.get("_BASE_", [])
    for base in [bases] if isinstance(bases, str) else bases:
        base = os.path.expanduser(str(base))
        if not base.startswith(("/", "https://", "http://")):  # as fvcore resolves it
            base = os.path.join(os.path.dirname(path), base)
        if "://" not in base:
            _check_yaml(base, named_in=path)


def _has_key(cfg: CfgNode, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, CfgNode) or part not in node:
            return False
        node = node[part]
    return True


def _check_overrides(cfg: CfgNode, opts: list, options: set) -> None:
    """Command-line overrides are KEY VALUE pairs, after the options."""
    for word in opts[::2]:
        if word in options:
            raise ValueError(
                f"option {word} must come before the KEY VALUE config overrides (they take the "
                "rest of the command line)"
            )
    if len(opts) % 2:
        # the key without a value: the first one followed by a key, else the last word
        keys = [_has_key(cfg, word) for word in opts]
        i = next((i for i in range(0, len(opts) - 1, 2) if keys[i] and keys[i + 1]), len(opts) - 1)
        raise ValueError(
            f"config key {opts[i]} has no value on the command line (overrides are KEY VALUE "
            "pairs)"
        )


_MISMATCH = re.compile(
    r"Type mismatch \(<class '(?P<old>[^']+)'> vs\. <class '(?P<new>[^']+)'>\) with values "
    r"\((?P<values>.*)\) for config key: (?P<key>\S+)$",
    re.S,
)


def _merge(cfg: CfgNode, merge, source: str) -> None:
    """``merge()``, with yacs's type errors (which print whole config groups) on one short line."""
    try:
        merge()
    except ValueError as e:
        found = _MISMATCH.match(str(e))
        if not found:
            raise
        key, old_type, new_type = found["key"], found["old"], found["new"]
        node = cfg
        for part in key.split("."):
            node = node[part]
        value = found["values"][len(f"{node} vs. ") :]
        value = value if len(value) <= 60 else value[:57] + "..."
        value = f"'{value}'" if new_type == "str" else value
        raise ValueError(
            f"config key {key} ({source}): expected a {_type_name(old_type)}, got the "
            f"{_type_name(new_type)} {value}"
        ) from None


def _type_name(qualified: str) -> str:
    return "group of keys" if qualified.endswith("CfgNode") else qualified.rsplit(".", 1)[-1]


def load_config(args) -> CfgNode:
    """The frozen config of ``--config-file`` and the command-line overrides."""
    cfg = get_cfg()
    add_c2s_config(cfg)
    _check_yaml(args.config_file)
    _merge(cfg, lambda: cfg.merge_from_file(args.config_file), f"in {args.config_file}")
    _check_overrides(cfg, args.opts, set(argument_parser()._option_string_actions))
    _merge(cfg, lambda: cfg.merge_from_list(args.opts), "on the command line")
    cfg.freeze()
    return cfg


# ------------------------------------------------------------------- checks before anything runs
# Numbers that must be > 0, or >= 0, to make sense; every float of the config must be finite.
_POSITIVE = (
    "SOLVER.BASE_LR", "SOLVER.IMS_PER_BATCH", "SOLVER.GAMMA",
    "MODEL.PIXEL_STD", "MODEL.C2S.CLASSIFIER.LOGIT_SCALE", "MODEL.C2S.DISTILL.LATENT.TAU",
)  # fmt: skip
_NON_NEGATIVE = (
    "SOLVER.MAX_ITER", "SOLVER.WEIGHT_DECAY", "SOLVER.MOMENTUM", "SOLVER.WARMUP_FACTOR",
    "SOLVER.WARMUP_ITERS", "SOLVER.BACKBONE_MULTIPLIER", "TEST.EVAL_PERIOD",
    "DATALOADER.NUM_WORKERS", "MODEL.C2S.NO_OBJECT_WEIGHT", "MODEL.C2S.CLASS_WEIGHT",
    "MODEL.C2S.MASK_WEIGHT", "MODEL.C2S.DICE_WEIGHT", "MODEL.C2S.DISTILL.GLOBAL.WEIGHT",
    "MODEL.C2S.DISTILL.LOCAL.WEIGHT", "MODEL.C2S.DISTILL.LATENT.CLASS_WEIGHT",
)  # fmt: skip
_INFINITY_ALLOWED = ("SOLVER.CLIP_GRADIENTS.NORM_TYPE",)  # the max-norm


def _numbers(node: CfgNode, prefix: str = ""):
    for k, v in node.items():
        if isinstance(v, CfgNode):
            yield from _numbers(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}", v, [v]
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
            yield f"{prefix}{k}", v, list(v)


def check_numbers(cfg: CfgNode) -> None:
    """Refuse NaN / infinite numbers, and non-positive ones where they make no sense."""
    for key, shown, values in _numbers(cfg):
        bad = [x for x in values if isinstance(x, float) and not math.isfinite(x)]
        if key in _INFINITY_ALLOWED:
            bad = [x for x in bad if x != math.inf]
        if bad:
            raise ValueError(f"config key {key} is {shown}: it must be a finite number")
        if key in _POSITIVE and min(values) <= 0:
            raise ValueError(f"config key {key} is {shown}: it must be > 0")
        if key in _NON_NEGATIVE and min(values) < 0:
            raise ValueError(f"config key {key} is {shown}: it must be >= 0")


def check_device(cfg: CfgNode, num_gpus: int) -> None:
    """``MODEL.DEVICE`` must name a device that this machine has."""
    name = cfg.MODEL.DEVICE
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"MODEL.DEVICE {name!r} is not a device name (cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"MODEL.DEVICE {name}: no CUDA GPU is available to PyTorch {torch.__version__} "
                "(torch.cuda.is_available() is False); use MODEL.DEVICE cpu"
            )
        need = max(num_gpus, (device.index or 0) + 1)
        if need > count:
            raise ValueError(
                f"MODEL.DEVICE {name} with --num-gpus {num_gpus} needs {need} GPUs; "
                f"{count} are visible"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"MODEL.DEVICE {name}: MPS is not available; use MODEL.DEVICE cpu")


def check_run(cfg: CfgNode, args) -> None:
    """What can be refused before anything is built or written."""
    check_env_datasets()  # a malformed $C2S_CUSTOM_DATASETS, kept from import time
    if getattr(args, "deterministic", False) and cfg.SEED < 0:
        raise ValueError(f"--deterministic needs SEED >= 0, got SEED {cfg.SEED}")
    check_numbers(cfg)
    check_device(cfg, args.num_gpus)
    resumable = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, TAG_FILE))
    if args.eval_only and not cfg.MODEL.WEIGHTS and not resumable:
        if not getattr(args, "allow_random_weights", False):
            raise ValueError(
                '--eval-only with MODEL.WEIGHTS "" would score a randomly initialised model: give '
                "MODEL.WEIGHTS <checkpoint> (or --allow-random-weights to do it on purpose)"
            )


def fetch_start_weights(cfg: CfgNode, args) -> None:
    """Download a URL in ``MODEL.WEIGHTS`` (``detectron2://...``) now, once per machine, before
    the processes start and the CLIP text embeddings are encoded: offline, the command ends here
    with one line naming the URL and what to do (a run resumed from a checkpoint needs none)."""
    if "://" not in cfg.MODEL.WEIGHTS:
        return
    if args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, TAG_FILE)):
        return
    fetch_weights(cfg.MODEL.WEIGHTS)


# ------------------------------------------------------------------------------------- the run
def setup(args):
    if getattr(args, "deterministic", False):
        enable_deterministic_mode()
    cfg = load_config(args)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="c2s_d2")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        # the student alone: the distillation branch and CLS queries are not even built
        model = Trainer.build_model(inference_cfg(cfg))
        # every tensor of the evaluated model must come from the file
        C2SCheckpointer(model, save_dir=cfg.OUTPUT_DIR, require_all_keys=True).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def _read(path: str):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _after_refusal(output_dir: str, saved_config, saved_tag, error: BaseException) -> None:
    """In a folder this run had locked: the traceback goes to log.txt, and config.yaml (which
    detectron2 rewrites at start) gets its previous content back if no checkpoint was saved."""
    try:
        _log_and_restore(output_dir, saved_config, saved_tag, error)
    except OSError:  # a full disk, say: the one-line message matters more
        pass


def _log_and_restore(output_dir: str, saved_config, saved_tag, error: BaseException) -> None:
    for name in ("c2s_d2", "detectron2", "fvcore"):
        for handler in logging.getLogger(name).handlers:
            try:
                handler.flush()
            except (OSError, ValueError):  # a closed or full stream: the log file matters
                pass
    log = os.path.join(output_dir, "log.txt")
    if os.path.isfile(log):
        with open(log, "a") as f:
            f.write(f"train_net.py: error: {one_line_error(error)}\n")
            traceback.print_exception(type(error), error, error.__traceback__, file=f)
    config = os.path.join(output_dir, "config.yaml")
    if saved_config is not None and _read(os.path.join(output_dir, TAG_FILE)) == saved_tag:
        if _read(config) != saved_config:
            atomic_write(config, lambda f: f.write(saved_config))


def run(args) -> None:
    lock = None
    try:
        cfg = load_config(args)
        check_run(cfg, args)
        output_dir = cfg.OUTPUT_DIR
        if args.machine_rank == 0 and "://" not in output_dir:  # one run per folder
            lock = OutputDirLock(output_dir).acquire()
            saved_config = _read(os.path.join(output_dir, "config.yaml"))
            saved_tag = _read(os.path.join(output_dir, TAG_FILE))
        fetch_start_weights(cfg, args)
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except Exception as e:
        if not is_user_error(e, scripts=(__file__,)):
            raise
        if lock is not None:
            _after_refusal(output_dir, saved_config, saved_tag, e)
        if getattr(args, "verbose", False):
            traceback.print_exc()
        sys.exit(f"train_net.py: error: {one_line_error(e)}")
    finally:
        if lock is not None:
            lock.release()


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels (torch.use_deterministic_algorithms); needs SEED >= 0",
    )
    parser.add_argument(
        "--allow-random-weights",
        action="store_true",
        help='with --eval-only: evaluate even with MODEL.WEIGHTS "" (a random student)',
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="on an input error, print the traceback before the one-line message",
    )
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    if not args.config_file:
        sys.exit("train_net.py: error: --config-file is required")
    if not os.path.isfile(args.config_file):
        sys.exit(f"train_net.py: error: config file not found: {args.config_file}")
    print("Command Line Args:", args)
    run(args)
