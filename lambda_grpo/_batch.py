"""`Batch`: the one structure every entry point normalises its inputs into, once (a leaf module:
it imports nothing of ours). Validation (lambda_grpo/_validate.py) builds it; the backends, the
custom ops and the engines only read it.

Two layouts live in it, so that nothing after validation looks at packing again:
- the *row layout* (B, T): every per-token tensor the row math reads (mask, advantages, old and
  reference log-probs, token weights, token ids), padded, zeros or False where masked;
- the *vocabulary layout* (N,): the token ids and mask in the order of the rows of the logits
  or hidden states that the vocabulary passes walk. Padded inputs: N = B*T and these are the
  (B, T) tensors of the row layout themselves, contiguous, indexed flat (no view: each is host
  time; a consumer that needs them 1-d reshapes). Packed inputs (`cu_seqlens`, lambda_grpo/_packed.py): N tokens, and
  `packed_pos` (N,) maps vocabulary row j to flat index packed_pos[j] of the row layout.
`to_rows` and `to_vocab` move a per-token tensor between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch


def compute_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """Per-token math runs in fp32, or float64 for float64 logits (docs/math.md §1)."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`: x itself when it is already (a no-op `.to` still costs a dispatch of host time)."""
    return x if x.dtype == dtype else x.to(dtype)


_NAN_ONE: dict = {}


def poisoned(x: torch.Tensor, poison: Optional[torch.Tensor]) -> torch.Tensor:
    """x, or NaN when the value rules of the inputs failed (`poison`, a 0-d bool on the device;
    lambda_grpo/_validate.py): the loss in the forward and the upstream gradient in the backward
    of the ops (no autograd node of its own), the loss in the reference's graph, so that the loss
    and every gradient are NaN, with no host read. None: no value rule applies."""
    if poison is None:
        return x
    if torch.compiler.is_compiling():  # traced (the backward under AOTAutograd): no cached real tensors
        return x * torch.where(poison, float("nan"), 1.0).to(x.dtype)
    nan, one = nan_one(x.device, x.dtype)
    return x * torch.where(poison, nan, one)


def nan_one(device, dtype):
    """0-d NaN and 1 on `device` (made once: a new constant per call is host time)."""
    key = (device, dtype)
    if key not in _NAN_ONE:
        _NAN_ONE[key] = (torch.full((), float("nan"), dtype=dtype, device=device),
                         torch.ones((), dtype=dtype, device=device))
    return _NAN_ONE[key]


def to_rows(x: torch.Tensor, pos: Optional[torch.Tensor], B: int, T: int, fill=0) -> torch.Tensor:
    """(N,) vocabulary layout -> (B, T) rows (fill elsewhere); differentiable (its gradient is the
    gather back). pos None: x is already (B*T,) or (B, T)."""
    if pos is None:
        return x if x.shape == (B, T) else x.reshape(B, T)
    out = torch.full((B * T,), fill, dtype=x.dtype, device=x.device)
    return out.index_put((pos,), x).view(B, T)


def from_rows(x: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    """(..., B, T) rows -> (..., N) vocabulary layout (the flat (..., B*T) when pos is None)."""
    lead = x.shape[:-2]
    flat = x.reshape(*lead, -1)
    return flat if pos is None else flat.index_select(flat.dim() - 1, pos)


# The tensors of a Batch that travel through the custom ops, by name, in this order (the ops take
# them as one list argument; lambda_grpo/_ops.py). `logits` / `hidden` / `logp` and `lam` travel as
# arguments of their own: they carry gradients.
PARTS = ("tokens", "mask", "advantages", "old_logp", "ref_logp", "num_tokens", "num_sequences", "group_lengths",
         "group_index", "token_weights", "packed_pos", "vocab_tokens", "vocab_mask", "poison")
PART = {name: i for i, name in enumerate(PARTS)}


@dataclass
class Batch:
    """Validated, normalised inputs (see the module docstring for the two layouts).

    `logits` is the (B, T, V) or packed (N, V) logits, or None for the entry points from
    log-probs and hidden states (their own tensors travel beside the Batch).
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
    packed_pos: Optional[torch.Tensor] = None  # (N,) int64: vocabulary row j is flat row-layout index pos[j]
    # (N,) int64 ids in the vocabulary layout, (B, T) padded (None: from log-probs)
    vocab_tokens: Optional[torch.Tensor] = None
    vocab_mask: Optional[torch.Tensor] = None  # (N,) bool, (B, T) padded
    # 0-d bool on the device: a value rule of the inputs failed (lambda_grpo/_validate.py), the loss
    # is then NaN; None when no value rule applies. `values` keeps what LossOutput.input_errors reads.
    poison: Optional[torch.Tensor] = None
    values: Any = None
    # the token ids are the caller's, unchecked and unclamped: the engine's kernels check them and
    # set `poison` (a one-element bool of this call's own; Engine.CHECKS_IDS, _validate.py)
    ids_unchecked: bool = False

    def __post_init__(self):
        if self.vocab_mask is None:  # padded: the vocabulary layout is the row layout, indexed flat
            self.vocab_mask = self.mask
            self.vocab_tokens = self.tokens

    @property
    def shape(self):
        """(B, T) of the row layout."""
        return tuple(self.mask.shape)

    def to_rows(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """A per-token tensor (N,) of the vocabulary layout in the (B, T) row layout."""
        B, T = self.mask.shape
        return to_rows(x, self.packed_pos, B, T, fill)

    def to_vocab(self, x: torch.Tensor) -> torch.Tensor:
        """(..., B, T) of the row layout -> (..., N) of the vocabulary layout."""
        return from_rows(x, self.packed_pos)

    def parts(self) -> List[Optional[torch.Tensor]]:
        """The tensors of PARTS, in order (what the custom ops take)."""
        return [getattr(self, name) for name in PARTS]

    @classmethod
    def from_parts(cls, parts: List[Optional[torch.Tensor]], logits, lam, group_size: int) -> "Batch":
        """The Batch of an op's arguments. Every field is given (the vocabulary layout included),
        so the dataclass __init__ and __post_init__ are skipped: this runs in every op call."""
        b = object.__new__(cls)
        d = b.__dict__
        d.update(zip(PARTS, parts))
        d.update(logits=logits, lam=lam, group_size=group_size, values=None, ids_unchecked=False)
        return b
