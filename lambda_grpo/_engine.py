"""The engine interface: what the custom ops (lambda_grpo/_ops.py) ask of an engine.

Two engines implement it, as modules: the torch engine (lambda_grpo/_vocab_torch.py, any device)
and the Triton engine (lambda_grpo/_vocab_triton.py, CUDA, or the CPU under TRITON_INTERPRET=1).
The ops name the engine by a string (a constant of a compiled graph) and load it on first use:
the Triton one must be imported after TRITON_INTERPRET is set.

Layouts: `logits2d` (N, V) rows of the logits (or of one chunk of them; (B, T, V) logits as they
are, rows strided or not, where the engine's ROWS_3D is True), `tokens` (N,) int64
clamped into [0, V), `mask` (N,) bool; per-token results (N,) in the compute dtype.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional, Protocol, Tuple

import torch

ENGINES = {"torch": "lambda_grpo._vocab_torch", "triton": "lambda_grpo._vocab_triton"}


class Engine(Protocol):
    # True: the vocabulary functions take (B, T, V) logits with any batch and row strides (a slice
    # such as logits[:, P-1:-1] is read where it lies); False: (N, V) only (such a slice is copied)
    ROWS_3D: bool
    # True: an upstream gradient is applied to a saved gradient in place, on the device, without a
    # host read (lambda_grpo/_ops.py:_upstream); False: read on the host, the saved gradient untouched
    RESCALE_IN_PLACE: bool
    # True: vocab_forward and vocab_fused take `id_flag`, a one-element bool they set when a counted
    # token id is outside [0, V) (the value rule of the ids runs in the kernels, and validation
    # hands over the ids unchecked, lambda_grpo/_validate.py); False: validation checks and clamps
    CHECKS_IDS: bool
    # True: row_pass makes the loss and dlam NaN when batch.poison is set (RowPass.poisoned), and
    # scale_ takes `poison` (the gradient NaN); False: the op layer applies it (_compute.poisoned)
    APPLIES_POISON: bool
    # The fused schedule's RowPass from the terms its vocabulary pass wrote (no row pass), or None:
    # finish_fused(terms, entropy, batch, cfg, consts, per_token) -> RowPass; vocab_fused then
    # takes `terms_out` (4 N fp32: l, rho, kl, clip code per token, zeros where masked)
    finish_fused: Optional[Callable]
    # lambda-GRPO's (w, f, df) in one launch, or None: the torch row math computes them
    # (lambda_grpo/_rowmath.py:aggregation_weights)
    group_weights: Optional[Callable]

    def vocab_forward(self, logits2d: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, tau: float,
                      want_entropy: bool, want_lse: bool
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(logp (N,), entropy (N,) or None, lse (2, N) = [max, log sum] or None): one pass over V."""

    def vocab_fused(self, logits2d: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, tau: float,
                    want_entropy: bool, inputs, cfg, out: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """(logp, entropy or None, dlogits (N, V) written into `out`): the forward and the gradient for
        an upstream gradient of 1 in one pass, for losses without row coupling; `inputs` is a
        lambda_grpo._rowmath.FusedInputs (flat per-token A, W, coef, old and reference log-probs)."""

    def vocab_backward(self, logits2d: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, lse: torch.Tensor,
                       gl: torch.Tensor, gh: Optional[torch.Tensor], H: Optional[torch.Tensor], tau: float,
                       scale: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """dlogits (N, V) = scale * softmax-VJP of gl = dL/dlogp and gh = dL/dH (H: the entropies);
        lse: (2, N) = [max, log sum], or the pair of (N,) tensors."""

    def scale_(self, d2d: torch.Tensor, mask: torch.Tensor, g: torch.Tensor,
               poison: Optional[torch.Tensor] = None) -> torch.Tensor:
        """In place d2d[mask] *= g (a 0-d tensor), NaN where poison (a 0-d bool, or None) is set."""

    def row_pass(self, logp: torch.Tensor, entropy: Optional[torch.Tensor], batch, cfg, consts,
                 per_token: bool = False, want_coef: bool = True):
        """lambda_grpo._rowmath.RowPass of (B, T) log-probs: loss, dL/dlogp, dL/dH, dL/dlam, metrics."""


_LOADED: dict = {}


def engine(name: str) -> Engine:
    """The engine module, imported on first use."""
    eng = _LOADED.get(name)
    if eng is None:
        eng = _LOADED[name] = importlib.import_module(ENGINES[name])
    return eng
