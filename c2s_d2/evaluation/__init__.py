from .report import HEADLINE_KEYS, format_headline, format_results_table  # noqa: F401
from .sem_seg_evaluator import C2SSemSegEvaluator, compute_zero_shot_metrics  # noqa: F401
