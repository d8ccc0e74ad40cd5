"""lambda_grpo: fused GRPO-family losses (GRPO, BNPO, DAPO, Dr. GRPO, lambda-GRPO, GRPO-lambda traces).

Public API (docs/math.md): LossConfig, grpo_loss, grpo_loss_from_logprobs, fused_linear_grpo_loss, GRPOLoss,
token_logprobs, linear_token_logprobs, group_advantages, LossOutput, check_values.
"""

from .api import (GRPOLoss, fused_linear_grpo_loss, group_advantages, grpo_loss, grpo_loss_from_logprobs,
                  linear_token_logprobs, token_logprobs)
from .config import LossConfig
from .output import LossOutput
from ._validate import check_values

__all__ = ["LossConfig", "LossOutput", "GRPOLoss", "grpo_loss", "grpo_loss_from_logprobs", "fused_linear_grpo_loss",
           "token_logprobs", "linear_token_logprobs", "group_advantages", "check_values"]
__version__ = "0.1.0"
