"""lambda_grpo: fused GRPO-family losses (GRPO, BNPO, DAPO, Dr. GRPO, lambda-GRPO, GRPO-lambda traces).

Public API (SPEC §7): LossConfig, grpo_loss, GRPOLoss, token_logprobs, group_advantages, LossOutput.
"""

from .api import GRPOLoss, group_advantages, grpo_loss, token_logprobs
from .config import LossConfig
from .output import LossOutput

__all__ = ["LossConfig", "LossOutput", "GRPOLoss", "grpo_loss", "token_logprobs", "group_advantages"]
__version__ = "0.1.0"
