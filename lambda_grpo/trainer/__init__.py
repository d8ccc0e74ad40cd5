"""A small GRPO-family trainer for Hugging Face causal LMs around `lambda_grpo.GRPOLoss` (issue 4).

`TrainConfig` describes a run, `GRPOTrainer(cfg).train()` runs it; the command line is
``python -m lambda_grpo.train --help`` (or ``lambda-grpo train --help``). See docs/training.md.
"""

from .config import COMPARE_METHODS, PRESETS, TrainConfig
from .loop import GRPOTrainer
from .model import builtin_model_dir
from .rewards import answers_match, correctness_rewards, extract_number, format_rewards

__all__ = ["TrainConfig", "GRPOTrainer", "builtin_model_dir", "PRESETS", "COMPARE_METHODS", "extract_number",
           "answers_match", "correctness_rewards", "format_rewards"]
