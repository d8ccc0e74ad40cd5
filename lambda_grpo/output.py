"""The result type every backend returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, List, Optional

import torch

SCALAR_METRICS = ("clip_frac_low", "clip_frac_high", "clip_frac", "ratio_mean")


def metric_names(cfg, has_ref: bool, with_seq_weight: bool = False) -> List[str]:
    """The metric keys a loss with config `cfg` reports (docs/math.md §8), in a fixed order."""
    return list(_metric_names(cfg.to_json(), cfg, has_ref, with_seq_weight))


@lru_cache(maxsize=128)
def _metric_names(key: str, cfg, has_ref: bool, with_seq_weight: bool) -> tuple:
    names = list(SCALAR_METRICS)
    if has_ref:
        names.append("kl_mean")
    if cfg.needs_entropy:
        names.append("entropy_mean")
    if cfg.surrogate == "vespo":
        names.append("phi_mean")
    if cfg.uses_lambda:
        names.append("lambda")
    if with_seq_weight:
        names.append("seq_weight")
    return tuple(names)


@dataclass
class LossOutput:
    """`loss`: 0-d tensor (fp32; float64 for float64 logits), differentiable w.r.t. logits and lam.

    `metrics`: detached tensors computed without a host sync (docs/math.md §8): 0-d means over the
    valid tokens of the local batch (`clip_frac_low`, `clip_frac_high`, `clip_frac`,
    `ratio_mean`, `kl_mean` when ref_logp is given, `entropy_mean` when entropy is computed,
    `lambda` for lambda_grpo, `phi_mean` (VESPO's weight phi) for surrogate="vespo") and
    `seq_weight` of shape (B,).

    `per_token`: with `return_per_token=True`, detached (B, T) tensors in the compute dtype,
    zero where masked: `loss` (l_t, unweighted), `ratio` (rho_t, the ratio that enters the
    clip: traced in ratio mode), `kl` (kl_t; zeros without ref_logp), `entropy` (H_t; zeros
    unless entropy is computed), and the clip flags (0/1): `clip_low` and `clip_high` (the token
    counts in clip_frac_low / clip_frac_high, by the surrogate's own rule; TRL's clip region is
    their sum) and `clip_dual` (the dual clip, or TRL's delta, sets the token's surrogate: verl's
    pg_clipfrac_lower). Otherwise None.
    """

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    per_token: Optional[Dict[str, torch.Tensor]] = None
    # what input_errors reads (the inputs' value rules, lambda_grpo/_validate.py); not for users
    _values: Any = field(default=None, repr=False, compare=False)

    @property
    def input_errors(self) -> List[str]:
        """The value rules of the inputs that failed, one message each (docs/math.md §10): token
        ids out of [0, V) where counted, mask values other than 0 and 1, `group_lengths` /
        `group_index` that do not match the rows. A failed rule makes the loss and its gradients
        NaN; the call itself never reads the inputs back from the device, reading this property
        does (one synchronisation, only when asked). Empty: every rule holds."""
        return [] if self._values is None else self._values.errors()

    def check_inputs(self) -> "LossOutput":
        """Raise ``ValueError`` with `input_errors` if any rule failed; return self otherwise."""
        errors = self.input_errors
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def __iter__(self):  # allows `loss, metrics = out`
        yield self.loss
        yield self.metrics
