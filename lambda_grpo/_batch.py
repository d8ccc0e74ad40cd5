"""`Batch`: the validated inputs every backend computes on (a leaf module: it imports nothing of ours)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


def compute_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """Per-token math runs in fp32, or float64 for float64 logits (SPEC §4)."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


@dataclass
class Batch:
    """Validated, normalised inputs. Shapes: logits (B, T, V); everything per token (B, T).

    The field order is the order of the custom ops' schema (lambda_grpo/_ops.py). `logits` is
    None for the entry point from log-probs (the row math never reads it). With packed inputs
    (`packed_pos` set) the logits are (N, V) and everything per token is in the padded (B, T_max)
    row layout (lambda_grpo/_packed.py).
    """

    logits: Optional[torch.Tensor]
    tokens: Optional[torch.Tensor]  # (B, T) int64 clamped into [0, V) (None: the entry point from log-probs)
    mask: torch.Tensor  # (B, T) bool
    advantages: torch.Tensor  # (B, T) compute dtype (per-sequence values broadcast)
    old_logp: Optional[torch.Tensor]  # (B, T) compute dtype or None
    ref_logp: Optional[torch.Tensor]
    lam: Optional[torch.Tensor]  # 0-d, as given (keeps its autograd graph)
    num_tokens: Optional[torch.Tensor]  # 0-d compute dtype or None (= local count)
    num_sequences: Optional[torch.Tensor]
    group_size: int
    # lambda-GRPO groups that are not contiguous rows: row i's group has the G lengths
    # group_lengths[i] (B, G) int64, and row i is member group_index[i] (B,) int64 of it
    group_lengths: Optional[torch.Tensor] = None
    group_index: Optional[torch.Tensor] = None
    token_weights: Optional[torch.Tensor] = None  # (B, T) compute dtype, multiplies the surrogate
    # packed (varlen) inputs (lambda_grpo/_packed.py): logits / hidden are (N, V) / (N, H) and packed
    # token j is at flat index packed_pos[j] of the (B, T) layout of every tensor above; None: padded
    packed_pos: Optional[torch.Tensor] = None
    # 0-d bool on the device: a value rule of the inputs failed (lambda_grpo/_validate.py), the loss
    # is then NaN; None when no value rule applies. `values` keeps what LossOutput.input_errors reads.
    poison: Optional[torch.Tensor] = None
    values: Any = None

    @property
    def shape(self):
        """(B, T) of the batch."""
        return tuple(self.mask.shape)
