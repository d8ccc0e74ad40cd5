"""TRL 1.16.0's GRPO loss, transcribed once for the tests and the benchmark.

`trl_policy_loss` follows `GRPOTrainer._compute_loss` of trl 1.16.0 (trl/trainer/grpo_trainer.py)
from the per-token log-probs on: the importance ratio (token or sequence level; `delta`'s
two-sided clip), the surrogates of loss types grpo / bnpo / dr_grpo / dapo / luspo (clip), cispo,
sapo and vespo (its gamma weights from `gamma_weights`: pass TRL's own
`GRPOTrainer.get_gamma_weights`), the k3 KL with `use_bias_correction_kl` (KL x ratio), and each
loss type's aggregation. Not transcribed: the entropy bonus (a separate token mean in TRL), the
entropy / off-policy masks and the vLLM correction. One process and no gradient accumulation:
`num_items_in_batch` is then the normaliser of cispo / dapo / vespo (pass the global count for
parity with lambda_grpo's `num_tokens`).
"""

from __future__ import annotations

from typing import Optional

import torch

CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def trl_policy_loss(per_token_logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                    old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor], *, loss_type: str,
                    beta: float, eps_low: float, eps_high: float, delta: Optional[float] = None,
                    use_bias_correction_kl: bool = False, sapo_temperature_pos: float = 1.0,
                    sapo_temperature_neg: float = 1.05, max_completion_length: Optional[int] = None,
                    num_items_in_batch: Optional[torch.Tensor] = None, importance_sampling_level: str = "token",
                    gamma_weights=None, vespo_kw: Optional[dict] = None) -> torch.Tensor:
    """The scalar loss; per_token_logps (B, T) carry the gradient; advantages (B,) or (B, T)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = per_token_logps.detach() if old_logp is None else old_logp
    log_ratio = per_token_logps - old
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:  # "sequence"
        fmask = mask.to(log_ratio.dtype)
        log_importance_weights = ((log_ratio * fmask).sum(-1) / fmask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = torch.exp(ref_logp - per_token_logps) - (ref_logp - per_token_logps) - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * advantages * per_token_logps
    elif loss_type in CLIP_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif loss_type == "sapo":
        temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * advantages
    elif loss_type == "vespo":
        phi_seq = gamma_weights(advantages=advantages, log_ratio_per_token=log_ratio, mask=mask,
                                importance_sampling_ratio=None, **(vespo_kw or {}))
        per_token_loss = -phi_seq * advantages * per_token_logps
    else:
        raise ValueError(f"loss_type: {loss_type!r} is not transcribed here")
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    mask = mask.to(per_token_loss.dtype)
    if loss_type in ("grpo", "sapo"):
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    if loss_type in ("cispo", "dapo", "vespo"):
        n = mask.sum() if num_items_in_batch is None else num_items_in_batch
        return (per_token_loss * mask).sum() / n.clamp(min=1.0)
    return (per_token_loss * mask).sum(-1).mean()  # luspo


def lambda_grpo_config_for(loss_type: str, **kw):
    """The lambda_grpo LossConfig that computes TRL's `loss_type` (kw: LossConfig fields)."""
    import lambda_grpo as lg

    aggregation = {"grpo": "grpo", "bnpo": "bnpo", "dr_grpo": "dr_grpo", "dapo": "dapo", "luspo": "seq_mean_token_sum",
                   "cispo": "dapo", "sapo": "grpo", "vespo": "dapo"}[loss_type]
    surrogate = {"cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}.get(loss_type, "clip")
    return lg.LossConfig(aggregation=aggregation, surrogate=surrogate, **kw)
