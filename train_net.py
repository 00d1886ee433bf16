#!/usr/bin/env python
"""Train and evaluate c2s-d2 models with Detectron2.

python train_net.py --config-file configs/miniworld/zs_baseline_R18.yaml MODEL.DEVICE cpu
python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <checkpoint>
python train_net.py --config-file <cfg> --num-gpus 8
python train_net.py --config-file <cfg> --resume        # continue exactly where a run stopped
"""

import logging
import os
import sys
from collections import OrderedDict

import detectron2.utils.comm as comm
from detectron2.config import get_cfg
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
from c2s_d2.evaluation import C2SSemSegEvaluator, format_headline
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
        return results[cfg.DATASETS.TEST[0]] if len(results) == 1 else results


def setup(args):
    if getattr(args, "deterministic", False):
        enable_deterministic_mode()
    cfg = get_cfg()
    add_c2s_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    if getattr(args, "deterministic", False) and cfg.SEED < 0:
        raise ValueError(f"--deterministic needs SEED >= 0, got SEED {cfg.SEED}")
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


def run(args) -> None:
    try:
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
        logging.getLogger("c2s_d2").debug("fatal", exc_info=True)
        sys.exit(f"train_net.py: error: {one_line_error(e)}")


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels (torch.use_deterministic_algorithms); needs SEED >= 0",
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
