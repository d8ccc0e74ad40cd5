"""Public functional API and the nn.Module (docs/math.md §13)."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import nn

from .config import LossConfig
from .output import LossOutput
from ._batch import compute_dtype, nan_one
from ._engine import engine
from ._entry import fast_linear_logprobs, fast_loss, fast_token_logprobs, linear_loss, rows_loss
from ._validate import (check_backend, check_logits_tokens, fail, safe_ids, validate, validate_linear,
                        validate_logprobs)

Number = Union[int, float, torch.Tensor, None]


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" is triton on CUDA and torch elsewhere (docs/math.md §13)."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def grpo_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    group_size: int,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    lam: Optional[torch.Tensor] = None,
    *,
    config: Optional[LossConfig] = None,
    num_tokens: Number = None,
    num_sequences: Number = None,
    backend: str = "auto",
    inplace_backward: bool = False,
    return_per_token: bool = False,
    group_lengths: Optional[torch.Tensor] = None,
    group_index: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> LossOutput:
    """The GRPO-family loss from policy logits (docs/math.md).

    The three loss functions share one argument order: the primary input(s) (here logits;
    logp; hidden, weight), tokens where the entry point takes them, mask, advantages,
    group_size, old_logp, ref_logp, lam, positional or by keyword; everything else (config,
    normalisers, backend, flags, group and packing tensors) is keyword-only.

    Args:
      logits: (B, T, V) fp32/bf16/fp16/fp64, *aligned*: logits[b, t] scores tokens[b, t]. A causal
        LM's output must be shifted by the caller: ``model(ids).logits[:, P-1:-1]`` for a prompt
        of length P.
      tokens: (B, T) integer ids of the completion; only ids where mask is set are read.
      mask: (B, T) bool or 0/1; tokens that count.
      advantages: (B,) per sequence or (B, T) per token.
      group_size: G; rows form contiguous groups of G responses, B % G == 0.
      old_logp, ref_logp: (B, T) behaviour / reference log-probs (None: on-policy / no KL).
      lam: 0-d tensor, the learnable lambda of lambda-GRPO (needed iff aggregation = lambda_grpo).
      config: LossConfig (default: LossConfig()).
      num_tokens, num_sequences: global normalisers for data parallel / accumulation.
      backend: "auto" | "reference" | "torch" | "triton".
      inplace_backward: write dlogits over the logits buffer instead of a new (B, T, V) tensor
        ("torch" and "triton" backends, contiguous logits, eager only: refused while
        torch.compile traces). **The logits are destroyed** (with no ratio-mode trace already by
        the forward), and backward can run once. Use it when nothing reads the logits again.
      return_per_token: also return per-token loss, ratio, KL and entropy (B, T) in
        ``out.per_token`` (see LossOutput).
      group_lengths, group_index: lambda-GRPO groups that are not contiguous rows (rows of a
        prompt spread over ranks or micro-batches, shuffled): group_lengths (B, G) int holds the G
        completion lengths of row i's group and group_index (B,) which of them row i is;
        group_lengths[i, group_index[i]] must equal row i's number of valid tokens. B % G is then
        not required. Other aggregations ignore them.
      token_weights: (B, T) per-token importance weights w_t, no gradient, multiplying the
        surrogate term: l_t = -w_t s_t + beta kl_t - entropy_coef H_t (TRL's vLLM importance
        sampling correction, verl's rollout_is_weights).
      cu_seqlens: packed (varlen) inputs, as TRL's padding_free and verl's use_remove_padding:
        (B+1,) int32/int64 cumulative segment offsets (cu_seqlens[0] = 0, non-decreasing, last =
        N). Then logits are (N, V), tokens, mask, old_logp, ref_logp, token_weights are (N,) and
        advantages (B,) per segment or (N,) per token (a 1-d tensor of length B is per segment,
        also when B == N). Segment i (tokens cu_seqlens[i]:cu_seqlens[i+1], possibly empty) is
        row i: traces never cross a boundary, lengths and lambda-GRPO groups (G contiguous
        segments, or group_lengths/group_index) come from the segments, and dr_grpo's default L
        (max_completion_length None) is T_max, the longest segment. The result equals that of the
        same batch padded to (B, T_max); dlogits are (N, V). No padding copy of the logits is
        made: the vocabulary passes (torch engine, Triton kernels) run on the packed (N, V) rows
        as they are; only the O(N) per-token tensors are scattered into a (B, T_max) layout for
        the row math (the Triton row kernel unchanged) and d(loss)/d(logp) is gathered back to
        packed order (lambda_grpo/_packed.py). cu_seqlens is read on the host once (its checks
        and T_max). `per_token` outputs are (N,).

    Returns: LossOutput(loss 0-d, metrics dict, per_token). No gradient flows to advantages,
    old_logp, ref_logp or the normalisers.
    """
    cfg = LossConfig() if config is None else config
    batch = validate(logits, tokens, mask, advantages, group_size, old_logp, ref_logp, lam, cfg, num_tokens,
                     num_sequences, group_lengths, group_index, token_weights, cu_seqlens,
                     ids_in_kernels=_ids_in_kernels(backend, logits))
    name = resolve_backend(backend, logits.device)
    _check_flags(name, logits, inplace_backward, return_per_token)
    if name == "reference":
        from .reference import reference_loss, reference_packed_loss

        if batch.packed_pos is not None:
            return _finish(reference_packed_loss(logits, batch, cfg, compute_dtype(logits.dtype), return_per_token),
                           batch)
        return _finish(reference_loss(batch, cfg, per_token=return_per_token), batch)
    if name == "triton":
        from ._vocab_triton import check_runnable

        check_runnable(logits)
        batch.logits = _unit_stride_along_v(logits)
    # eager and torch.compile alike: the custom ops of lambda_grpo/_ops.py
    return _finish(fast_loss(batch, cfg, name, inplace=inplace_backward, per_token=return_per_token), batch)


def _ids_in_kernels(backend: str, logits) -> bool:
    """Whether the engine's kernels check the token ids (Engine.CHECKS_IDS: the Triton engine), so
    that validation does not (docs/math.md §10). Eager only: the kernels write the verdict into a
    tensor the op takes, which torch.compile's functionalisation must not see."""
    if torch.compiler.is_compiling():
        return False
    on_cuda = isinstance(logits, torch.Tensor) and logits.device.type == "cuda"
    name = "triton" if backend == "triton" or (backend == "auto" and on_cuda) else None
    return name is not None and engine(name).CHECKS_IDS


def _unit_stride_along_v(logits: torch.Tensor) -> torch.Tensor:
    """The Triton kernels read each row of V logits with unit stride (rows may be strided, as
    `model(ids).logits[:, P-1:-1]` is); another layout is copied once (a differentiable copy:
    the gradient flows back to the caller's tensor). inplace_backward already refused it."""
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        return logits.contiguous()
    return logits


def _finish(out: LossOutput, batch) -> LossOutput:
    """The LossOutput with the value rules' record (lambda_grpo/_validate.py): a failed rule made the
    loss, and every gradient through it, NaN (no host read: the ops and the reference apply it,
    lambda_grpo/_batch.py:poisoned); `out.input_errors` says which rule, when read."""
    return LossOutput(out.loss, out.metrics, out.per_token, batch.values)


def grpo_loss_from_logprobs(
    logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    group_size: int,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    lam: Optional[torch.Tensor] = None,
    *,
    entropy: Optional[torch.Tensor] = None,
    config: Optional[LossConfig] = None,
    num_tokens: Number = None,
    num_sequences: Number = None,
    group_lengths: Optional[torch.Tensor] = None,
    group_index: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    return_per_token: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> LossOutput:
    """The same loss from per-token log-probs: for engines that never hand the loss logits (TRL
    1.16's fused LM head, verl's actor), with the same config, metrics and rules.

    Args:
      logp: (B, T) log-probs of the sampled tokens under the policy, any float dtype (math in
        fp32, float64 for float64), differentiable: the gradient flows on to whatever produced
        them. They are taken at the caller's temperature: ``config.temperature`` is not applied.
      entropy: (B, T) per-token entropies (differentiable), required iff the config uses entropy
        (entropy_coef != 0 or compute_entropy).
      mask, advantages, group_size, old_logp, ref_logp, lam, config, num_tokens, num_sequences,
      group_lengths, group_index, token_weights, return_per_token: as in :func:`grpo_loss`.
      cu_seqlens: packed (varlen) inputs (B+1,) as in :func:`grpo_loss`: then logp, entropy, mask,
        old_logp, ref_logp, token_weights are (N,) and advantages (B,) or (N,). The log-probs are
        scattered into the (B, T_max) row layout by an autograd index op (O(N)), so the gradients
        to logp and entropy come back (N,); `per_token` outputs are (N,).

    Computed by the closed-form row math (lambda_grpo/_rowmath.py) behind the custom op
    lambda_grpo::rows_fwd, on any device, eager or compiled. Gradients reach logp, entropy and lam.
    """
    cfg = LossConfig() if config is None else config
    batch = validate_logprobs(logp, entropy, mask, advantages, group_size, old_logp, ref_logp, lam, cfg, num_tokens,
                              num_sequences, group_lengths, group_index, token_weights, cu_seqlens)
    _check_flags("rows", logp, False, return_per_token)
    entropy = entropy if cfg.needs_entropy else None
    if batch.packed_pos is not None:  # an autograd scatter into the row layout: the gradients come back (N,)
        logp, entropy = batch.to_rows(logp), None if entropy is None else batch.to_rows(entropy)
    return _finish(rows_loss(logp, entropy, batch, cfg, per_token=return_per_token), batch)


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    group_size: int,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    lam: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    config: Optional[LossConfig] = None,
    num_tokens: Number = None,
    num_sequences: Number = None,
    group_lengths: Optional[torch.Tensor] = None,
    group_index: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    backend: str = "auto",
    return_per_token: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> LossOutput:
    """The same loss from the last hidden states and the LM head: the (B, T, V) logits never exist.

    Args:
      hidden: (B, T, H) fp32/bf16/fp16/fp64, aligned like logits: hidden[b, t] is the state whose
        projection scores tokens[b, t] (``model.model(ids).last_hidden_state[:, P-1:-1]``).
      weight: (V, H) the LM head's weight (same dtype and device); bias: (V,) or None.
      The rest as in :func:`grpo_loss`.
      cu_seqlens: packed (varlen) inputs (B+1,) as in :func:`grpo_loss`: then hidden is (N, H), tokens,
        mask, old_logp, ref_logp, token_weights (N,) and advantages (B,) or (N,). The chunks walk
        the packed rows of hidden directly (no padding copy, no (B, T_max, H) tensor); dhidden is
        (N, H); `per_token` outputs are (N,).

    Tokens are processed in chunks (lambda_grpo/_linear.py: logits of a chunk = h @ W^T with fp32
    accumulation, the engine's fused vocabulary pass, dh = dlogits W, dW += dlogits^T h), so the
    peak extra memory is dhidden + dW + one chunk of logits. backend "reference" materialises the
    logits in float64; "torch" and "triton" chunk (matmuls by torch, vocabulary passes by the
    engine). Gradients reach hidden, weight, bias and lam.
    """
    cfg = LossConfig() if config is None else config
    batch = validate_linear(hidden, weight, bias, tokens, mask, advantages, group_size, old_logp, ref_logp, lam, cfg,
                            num_tokens, num_sequences, group_lengths, group_index, token_weights, cu_seqlens)
    name = resolve_backend(backend, hidden.device)
    _check_flags(name, hidden, False, return_per_token)
    if name == "reference":
        from .reference import reference_linear_loss

        return _finish(reference_linear_loss(hidden, weight, bias, batch, cfg, per_token=return_per_token), batch)
    if name == "triton":
        from ._vocab_triton import check_runnable

        check_runnable(hidden, "hidden")
    return _finish(linear_loss(hidden, weight, bias, batch, cfg, name, per_token=return_per_token), batch)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, *,
                          bias: Optional[torch.Tensor] = None, temperature: float = 1.0, return_entropy: bool = True,
                          backend: str = "auto"):
    """Per-token log-probs (and entropies) from hidden states and the LM head, chunk by chunk:
    (logp (B, T), H (B, T) or None), fp32 (float64 for float64 inputs), differentiable w.r.t.
    hidden, weight and bias. The logits never exist in full; the backward recomputes each
    chunk's logits (one more matmul) instead of keeping them. Packed inputs: hidden (N, H) with
    tokens (N,) give (N,) tensors (no cu_seqlens needed)."""
    # tokens first: the mask below is made from them, and this function takes no mask to name
    if not isinstance(tokens, torch.Tensor):
        fail("tokens", "a torch.Tensor", type(tokens).__name__)
    if isinstance(hidden, torch.Tensor) and tuple(tokens.shape) != tuple(hidden.shape[:-1]):
        lead = "(N,) (N of hidden (N, H))" if hidden.dim() == 2 else "(B, T) (B, T of hidden (B, T, H))"
        fail("tokens", f"shape {tuple(hidden.shape[:-1])}: {lead}", f"shape {tuple(tokens.shape)}")
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 2:  # packed (N, H): a (1, N, H) view
        mask = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        validate_linear(hidden, weight, bias, tokens, mask, None, 1, None, None, None, LossConfig(aggregation="dapo"),
                        None, None, packed=True)
        lp, H = linear_token_logprobs(hidden[None], weight, tokens[None], bias=bias, temperature=temperature,
                                      return_entropy=return_entropy, backend=backend)
        return lp[0], (None if H is None else H[0])
    mask = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    batch_cfg = LossConfig(aggregation="dapo")
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature) or not temperature > 0):
        fail("temperature", "a finite number > 0", repr(temperature))
    if not isinstance(return_entropy, bool):
        fail("return_entropy", "a bool", repr(return_entropy))
    validate_linear(hidden, weight, bias, tokens, mask, torch.zeros(mask.shape[0], device=mask.device), 1, None,
                    None, None, batch_cfg, None, None)
    ids, bad = safe_ids(tokens, weight.shape[0])
    name = resolve_backend(backend, hidden.device)
    if name == "reference":
        from .reference import reference_vocab

        logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
        lp, H = reference_vocab(logits, ids, mask, float(temperature), return_entropy)
        out = compute_dtype(hidden.dtype)
        lp, H = lp.to(out), (None if H is None else H.to(out))
    else:
        if name == "triton":
            from ._vocab_triton import check_runnable

            check_runnable(hidden, "hidden")
        lp, H = fast_linear_logprobs(hidden, weight, bias, ids, float(temperature), return_entropy, name)
    return _nan_where(bad, lp), H


def _check_flags(backend: str, logits: torch.Tensor, inplace_backward, return_per_token) -> None:
    for flag, v in (("inplace_backward", inplace_backward), ("return_per_token", return_per_token)):
        if not isinstance(v, bool):
            fail(flag, "a bool", repr(v))
    if inplace_backward:
        if backend == "reference":
            fail("inplace_backward", "False with backend='reference' (autograd makes its own gradient)", True)
        if torch.compiler.is_compiling():
            fail("inplace_backward", "False while torch.compile traces (it would mutate a graph input)", True)
        if not logits.is_contiguous():
            fail("inplace_backward", "True only with contiguous logits (the gradient is written over them)",
                 f"logits with strides {logits.stride()}")


class GRPOLoss(nn.Module):
    """nn.Module wrapper of :func:`grpo_loss`; owns ``lam`` (an nn.Parameter, initial 0) for lambda_grpo.

    ``lam`` is a scalar parameter; give it its own optimiser group (e.g. ``loss_fn.lam``) if it
    should learn at another rate than the model. ``inplace_backward`` (see :func:`grpo_loss`) is
    a constructor option.
    """

    def __init__(self, config: Optional[LossConfig] = None, backend: str = "auto", lam_init: float = 0.0,
                 inplace_backward: bool = False):
        super().__init__()
        self.config = LossConfig() if config is None else config
        if not isinstance(self.config, LossConfig):
            fail("config", "a lambda_grpo.LossConfig", type(self.config).__name__)
        check_backend(backend)
        if not isinstance(inplace_backward, bool):
            fail("inplace_backward", "a bool", repr(inplace_backward))
        self.backend = backend
        self.inplace_backward = inplace_backward
        if self.config.uses_lambda:
            self.lam = nn.Parameter(torch.tensor(float(lam_init)))
        else:
            self.lam = None

    def forward(self, logits, tokens, mask, advantages, group_size, old_logp=None, ref_logp=None, *,
                num_tokens=None, num_sequences=None, return_per_token: bool = False, group_lengths=None,
                group_index=None, token_weights=None, cu_seqlens=None) -> LossOutput:
        """:func:`grpo_loss` with this module's config, backend and lam (cu_seqlens: packed inputs)."""
        return grpo_loss(logits, tokens, mask, advantages, group_size=group_size, old_logp=old_logp,
                         ref_logp=ref_logp, lam=self.lam, config=self.config, num_tokens=num_tokens,
                         num_sequences=num_sequences, backend=self.backend,
                         inplace_backward=self.inplace_backward, return_per_token=return_per_token,
                         group_lengths=group_lengths, group_index=group_index, token_weights=token_weights,
                         cu_seqlens=cu_seqlens)

    def forward_hidden(self, hidden, weight, tokens, mask, advantages, group_size, old_logp=None, ref_logp=None,
                       **kwargs) -> LossOutput:
        """:func:`fused_linear_grpo_loss` with this module's config, backend and lam."""
        for k in ("lam", "config", "backend"):
            if k in kwargs:
                fail(k, "not given (GRPOLoss owns it)", "a value")
        return fused_linear_grpo_loss(hidden, weight, tokens, mask, advantages, group_size, old_logp, ref_logp,
                                      self.lam, config=self.config, backend=self.backend, **kwargs)

    def forward_logprobs(self, logp, mask, advantages, group_size, old_logp=None, ref_logp=None,
                         **kwargs) -> LossOutput:
        """:func:`grpo_loss_from_logprobs` with this module's config and lam (same keywords)."""
        for k in ("lam", "config"):
            if k in kwargs:
                fail(k, "not given (GRPOLoss owns it)", "a value")
        return grpo_loss_from_logprobs(logp, mask, advantages, group_size, old_logp, ref_logp, self.lam,
                                       config=self.config, **kwargs)

    def extra_repr(self) -> str:
        return f"config={self.config}, backend={self.backend!r}, inplace_backward={self.inplace_backward}"


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   backend: str = "auto") -> torch.Tensor:
    """Fused selective log-softmax: log_softmax(logits / tau)[tokens], shape (B, T), fp32.

    logits: (B, T, V) aligned with tokens (B, T). Differentiable w.r.t. logits. Float64 logits
    give float64. Memory: no (B*T, V) intermediate on the torch/triton backends. Packed inputs:
    logits (N, V) with tokens (N,) give (N,) (log-probs are per token: no cu_seqlens needed).
    """
    if isinstance(logits, torch.Tensor) and logits.dim() not in (2, 3):
        fail("logits", "shape (B, T, V), or (N, V) packed", f"shape {tuple(logits.shape)}")
    if isinstance(logits, torch.Tensor) and logits.dim() == 2:  # packed (N, V): a (1, N, V) view
        check_logits_tokens(logits, tokens, packed=True)
        return token_logprobs(logits[None], tokens[None], temperature, backend)[0]
    check_logits_tokens(logits, tokens)
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature) or not temperature > 0):
        fail("temperature", "a finite number > 0", repr(temperature))
    name = resolve_backend(backend, logits.device)
    # ids out of [0, V) give NaN at their own positions (no host read; under check_values() the
    # call raises instead, in check_logits_tokens)
    ids, bad = safe_ids(tokens, logits.shape[-1])
    if name == "reference":
        from .reference import reference_token_logprobs

        lp = reference_token_logprobs(logits, ids, float(temperature))
    else:
        if name == "triton":
            from ._vocab_triton import check_runnable

            check_runnable(logits)
            logits = _unit_stride_along_v(logits)
        lp = fast_token_logprobs(logits, ids, float(temperature), name)
    return _nan_where(bad, lp)


def _nan_where(bad: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """NaN at the positions whose token id was out of range (safe_ids), lp elsewhere."""
    return torch.where(bad, nan_one(lp.device, lp.dtype)[0], lp)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages, (B,) -> (B,) in fp32 (float64 for float64 rewards).

    A_i = r_i - mean_g(r); with scale="std" divided by (std_g + eps), where std is the unbiased
    (n - 1) group standard deviation as in TRL's GRPOTrainer; scale="none" is Dr. GRPO's
    unscaled variant; scale="batch" divides by the std of the whole batch (TRL
    scale_rewards="batch"). eps: a finite number >= 0 (default 1e-4, as TRL).

    A group of equal (finite) rewards gets exactly zero advantages for every scale and every
    eps, eps = 0 included (where the formula is 0/0), and even where the mean of the equal
    values rounds. Non-finite rewards give non-finite advantages.
    """
    if not isinstance(rewards, torch.Tensor):
        fail("rewards", "a torch.Tensor", type(rewards).__name__)
    if rewards.dim() != 1:
        fail("rewards", "shape (B,)", f"shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        fail("group_size", "a positive int", repr(group_size))
    if rewards.shape[0] % group_size != 0:
        fail("group_size", f"a divisor of B = {rewards.shape[0]}", group_size)
    if scale not in ("std", "none", "batch"):
        fail("scale", "one of ('std', 'none', 'batch')", repr(scale))
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        fail("eps", "a finite number >= 0", repr(eps))
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(dtype).view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "std":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r)
        centred = centred / (std + eps)
    elif scale == "batch":
        std = rewards.to(dtype).std() if rewards.numel() > 1 else torch.zeros((), dtype=dtype, device=rewards.device)
        centred = centred / (std + eps)
    hi = r.amax(dim=1, keepdim=True)
    equal = (hi == r.amin(dim=1, keepdim=True)) & torch.isfinite(hi)
    return torch.where(equal, torch.zeros_like(centred), centred).reshape(-1)
