"""The reference backend: docs/math.md §2-§8 in plain torch, line by line. The source of truth.

Nothing here is optimised. Autograd produces every gradient, d(lambda) included. All math
runs in `dtype` (float64 by default) whatever the dtype of the logits; the loss and metrics
are returned in the output dtype of docs/math.md §8 (fp32, or float64 for float64 logits). Tests compare
every other backend with this module, and measure "plain torch in the logits' dtype" by
calling it with `dtype=torch.float32`.
"""

from __future__ import annotations

import torch

from .config import (LENGTH_H_MIN, LENGTH_SIGMA_MIN, LOG_RATIO_CLAMP, VESPO_LAMBDA_MIN, VESPO_LOG_W_MIN,
                     LossConfig)
from .output import LossOutput
from ._batch import Batch, compute_dtype, poisoned


def trace_weight_matrix(n: int, a: float, style: str, dtype, device) -> torch.Tensor:
    """(n, n) matrix w[t, k] of docs/math.md §3 over valid-token ordinals; zero above the diagonal."""
    t = torch.arange(n, device=device)[:, None]
    k = torch.arange(n, device=device)[None, :]
    if style == "recent":
        power = t - k
    elif style == "both":
        power = torch.minimum(t - k, k)
    else:
        raise ValueError(f"trace: expected 'recent' or 'both', got {style!r}")
    w = torch.tensor(a, dtype=dtype, device=device) ** power.clamp(min=0).to(dtype)
    return torch.where(k <= t, w, torch.zeros((), dtype=dtype, device=device))


def traced_log_ratio(x: torch.Tensor, mask: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Ratio mode: z_t = sum_{k <= t} w(t, k) x_k over the valid tokens of each row."""
    rows = []
    for i in range(x.shape[0]):
        idx = mask[i].nonzero().squeeze(1)
        w = trace_weight_matrix(len(idx), cfg.trace_decay, cfg.trace, x.dtype, x.device)
        rows.append(torch.zeros_like(x[i]).index_put((idx,), w @ x[i, idx]))
    return torch.stack(rows)


def trace_coefficients(mask: torch.Tensor, cfg: LossConfig, dtype) -> torch.Tensor:
    """Weight mode: c_k = sum_{t >= k} w(t, k) over the valid tokens of each row; 0 when masked."""
    rows = []
    for i in range(mask.shape[0]):
        idx = mask[i].nonzero().squeeze(1)
        w = trace_weight_matrix(len(idx), cfg.trace_decay, cfg.trace, dtype, mask.device)
        rows.append(torch.zeros(mask.shape[1], dtype=dtype, device=mask.device).index_put((idx,), w.sum(0)))
    return torch.stack(rows)


def lambda_grpo_weights(lengths: torch.Tensor, group_size: int, lam: torch.Tensor, r: float) -> torch.Tensor:
    """f_i = G * softmax_{j in group}(h_j ** lam)_i with h from standardised lengths (docs/math.md §5).

    lengths: (B,) float64 counts n_i. lam: 0-d float64 (differentiable). Returns (B,) float64.

    h ** lam overflows float64 once u = lam ln h exceeds 709 (lam = 1e4; lam = -60 at h = 1e-6).
    The softmax is shift-invariant, so it is taken of h^lam - e^c = e^c expm1(u - c) with the
    constant c = max_j u_j (detached: any constant shift gives the same softmax and the same
    gradient). Where c > 700 the factor e^c is capped at e^700 and f is detached: there every
    entry below the maximum already has softmax weight exactly 0 in float64 (its shifted value
    is below -745 once c > 14 for any two distinct lengths), so f is the even split over the
    tied maxima and df/dlam is 0 to float64 precision.
    """
    n = lengths.view(-1, group_size)
    mu = n.mean(dim=1, keepdim=True)
    sigma = n.std(dim=1, correction=0, keepdim=True)
    z = torch.where(sigma < LENGTH_SIGMA_MIN, torch.zeros_like(n), (n - mu) / sigma)
    h = torch.clamp(1 + r * z, min=LENGTH_H_MIN)
    u = lam * torch.log(h)  # ln(h ** lam)
    c = u.detach().amax(dim=1, keepdim=True)
    f = group_size * torch.softmax(torch.exp(torch.clamp(c, max=700.0)) * torch.expm1(u - c), dim=1)
    f = torch.where(c > 700.0, f.detach(), f)
    return f.reshape(-1)


def kl_divergence(logp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    d = ref - logp
    if estimator == "k3":
        return torch.exp(d) - d - 1
    if estimator == "k1":
        return -d
    return d * d / 2


def reference_vocab(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, temperature: float,
                    need_entropy: bool, dtype=torch.float64):
    """Per-token logp = log_softmax(logits / tau)[token] and entropy H (or None), (B, T) in `dtype`.

    Masked positions' logits are replaced by zeros first, so that whatever they hold (nan, inf)
    neither reaches the loss nor gives them a non-zero gradient; their token ids may be anything.
    """
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    scaled = torch.where(mask[..., None], logits.to(dtype), zero) / temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    safe_tokens = torch.where(mask, tokens, torch.zeros_like(tokens))
    logp = torch.where(mask, logprobs.gather(-1, safe_tokens[..., None]).squeeze(-1), zero)
    entropy = -(torch.softmax(scaled, dim=-1) * logprobs).sum(-1) if need_entropy else None
    return logp, entropy


def reference_loss(batch: Batch, cfg: LossConfig, dtype=torch.float64, per_token: bool = False) -> LossOutput:
    """docs/math.md §2-§8 for a validated batch from logits; `dtype` is the dtype of all the math."""
    logp, entropy = reference_vocab(batch.logits, batch.tokens, batch.mask, cfg.temperature, cfg.needs_entropy, dtype)
    return reference_rows(logp, entropy, batch, cfg, compute_dtype(batch.logits.dtype), dtype, per_token)


def reference_linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias, mask: torch.Tensor,
                            dtype=torch.float64) -> torch.Tensor:
    """hidden @ W^T (+ b) in `dtype`, for hidden (B, T, H) with mask (B, T) or packed (N, H) with
    mask (N,). Masked rows of hidden are replaced by zeros first: whatever they hold (NaN, inf, as
    attention gives for fully padded rows) must reach neither the loss nor any gradient. Masking
    the logits afterwards (reference_vocab) is not enough: the matmul's VJP dW = dlogits^T h
    multiplies the zero dlogits rows by the hidden rows, and 0 * NaN is NaN."""
    zero = torch.zeros((), dtype=dtype, device=hidden.device)
    h = torch.where(mask[..., None], hidden.to(dtype), zero)
    logits = h @ weight.to(dtype).T
    return logits if bias is None else logits + bias.to(dtype)


def reference_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, bias, batch: Batch, cfg: LossConfig,
                          dtype=torch.float64, per_token: bool = False) -> LossOutput:
    """The loss from hidden states (B, T, H) and the LM head weight (V, H) (and bias (V,)): the
    logits hidden @ W^T + b materialised in `dtype` (reference_linear_logits: masked rows of hidden
    take no part), then the reference loss. Autograd gives dhidden, dW, db and dlam.

    Packed inputs (batch.packed_pos set): hidden (N, H), every per-token tensor of `batch` in the
    (B, T_max) row layout; the per-token log-probs are computed on the packed rows and scattered
    into the row layout by an autograd index op, so dhidden comes back (N, H) and per-token
    outputs (N,)."""
    pos = batch.packed_pos
    if pos is None:
        logits = reference_linear_logits(hidden, weight, bias, batch.mask, dtype)
        logp, entropy = reference_vocab(logits, batch.tokens, batch.mask, cfg.temperature, cfg.needs_entropy, dtype)
        return reference_rows(logp, entropy, batch, cfg, compute_dtype(hidden.dtype), dtype, per_token)
    logits = reference_linear_logits(hidden, weight, bias, batch.vocab_mask, dtype)
    return reference_packed_loss(logits, batch, cfg, compute_dtype(hidden.dtype), per_token, dtype)


def reference_rows(logp: torch.Tensor, entropy, batch: Batch, cfg: LossConfig, out_dtype, dtype=torch.float64,
                   per_token: bool = False) -> LossOutput:
    """docs/math.md §2-§8 from per-token logp (B, T) (and entropy H (B, T) or None), differentiable in
    both: everything after the vocabulary. Results in `out_dtype`, math in `dtype`."""
    mask = batch.mask
    B, T = mask.shape
    zero = torch.zeros((), dtype=dtype, device=mask.device)

    # §4 per-token math. Masked positions take no part in anything: their old/ref log-probs,
    # advantages and token weights may hold anything (nan, -inf), so they are replaced by zeros
    # before any math, and the where() also stops any gradient from reaching them.
    logp = torch.where(mask, logp.to(dtype), zero)
    if entropy is not None:
        entropy = torch.where(mask, entropy.to(dtype), zero)
    old = logp.detach() if batch.old_logp is None else torch.where(mask, batch.old_logp.to(dtype), zero)
    x = logp - old

    maskf = mask.to(dtype)
    lengths = maskf.sum(dim=1)
    if cfg.ratio_trace:
        z = traced_log_ratio(x, mask, cfg)
    elif cfg.importance_sampling == "sequence":  # GSPO: the row's mean log-ratio for every token
        z = torch.where(mask, ((x * maskf).sum(dim=1) / torch.clamp(lengths, min=1))[:, None], zero)
    else:
        z = x
    rho = torch.exp(torch.clamp(z, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))

    A = torch.where(mask, batch.advantages.to(dtype), zero)
    if cfg.adv_clamp_min is not None:
        A = torch.clamp(A, min=cfg.adv_clamp_min)
    clip_dual = torch.zeros_like(mask)
    if cfg.surrogate == "clip":  # PPO clip, TRL's delta (two-sided) and the dual clip
        coef_1 = rho if cfg.delta is None else torch.clamp(rho, max=cfg.delta)
        clipped = torch.clamp(rho, 1 - cfg.eps_low, 1 + cfg.eps_high) * A
        surrogate = torch.minimum(coef_1 * A, clipped)
        if cfg.dual_clip is not None:
            surrogate = torch.where(A < 0, torch.maximum(surrogate, cfg.dual_clip * A), surrogate)
        clip_low, clip_high = (A < 0) & (rho < 1 - cfg.eps_low), (A > 0) & (rho > 1 + cfg.eps_high)
        if cfg.dual_floor is not None:  # the dual clip or delta sets s: min(rho A, clip A) below c A, A < 0
            clip_dual = (A < 0) & (torch.minimum(rho * A, clipped) < cfg.dual_floor * A)
    elif cfg.surrogate == "cispo":  # the clipped ratio is a constant weight of the log-prob's gradient
        surrogate = torch.clamp(rho, max=cfg.eps_high).detach() * A * logp
        clip_low, clip_high = torch.zeros_like(mask), (A > 0) & (rho > cfg.eps_high)
    elif cfg.surrogate == "cispo_two_sided":  # verl's cispo: clipped on both sides, relative bounds
        surrogate = torch.clamp(rho, 1 - cfg.eps_low, 1 + cfg.eps_high).detach() * A * logp
        clip_low, clip_high = rho < 1 - cfg.eps_low, rho > 1 + cfg.eps_high
    elif cfg.surrogate == "vespo":  # TRL's get_gamma_weights: a detached weight of the sequence ratio
        log_w = (torch.clamp(x, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * maskf).sum(dim=1, keepdim=True)
        log_w = torch.clamp(log_w, VESPO_LOG_W_MIN, LOG_RATIO_CLAMP)
        k = torch.where(A >= 0, torch.full_like(A, cfg.vespo_k_pos), torch.full_like(A, cfg.vespo_k_neg))
        lam_v = torch.clamp(torch.where(A >= 0, torch.full_like(A, cfg.vespo_lambda_pos),
                                        torch.full_like(A, cfg.vespo_lambda_neg)), min=VESPO_LAMBDA_MIN)
        phi = torch.exp(lam_v + k * log_w - lam_v * torch.exp(log_w)).detach()
        surrogate = phi * A * logp
        clip_low = clip_high = torch.zeros_like(mask)
    else:  # sapo: a soft gate instead of the clip
        tau = torch.where(A > 0, torch.full_like(A, cfg.sapo_tau_pos), torch.full_like(A, cfg.sapo_tau_neg))
        surrogate = torch.sigmoid(tau * (rho - 1)) * 4 / tau * A
        clip_low = clip_high = torch.zeros_like(mask)
    if cfg.weight_trace:
        surrogate = trace_coefficients(mask, cfg, dtype) * surrogate
    if batch.token_weights is not None:
        surrogate = torch.where(mask, batch.token_weights.to(dtype), zero) * surrogate

    token_loss = -surrogate
    kl = None
    if batch.ref_logp is not None:
        kl = kl_divergence(logp, torch.where(mask, batch.ref_logp.to(dtype), zero), cfg.kl_estimator)
        if cfg.kl_ratio_weighted:  # TRL's bias-corrected KL: times the ratio, gradient included
            kl = rho * kl
        if cfg.beta != 0:
            token_loss = token_loss + cfg.beta * kl
    if entropy is not None and cfg.entropy_coef != 0:
        token_loss = token_loss - cfg.entropy_coef * entropy
    token_loss = torch.where(mask, token_loss, zero)

    # §5 aggregation
    local_tokens = maskf.sum()
    n_tok = local_tokens if batch.num_tokens is None else batch.num_tokens.to(dtype)
    n_seq = (torch.tensor(float(B), dtype=dtype, device=mask.device) if batch.num_sequences is None
             else batch.num_sequences.to(dtype))
    seq_weight = torch.ones(B, dtype=dtype, device=mask.device)
    if cfg.aggregation == "grpo":
        W = 1 / (n_seq * torch.clamp(lengths, min=1))[:, None]
    elif cfg.aggregation == "bnpo":
        W = 1 / torch.clamp(local_tokens, min=1)
    elif cfg.aggregation == "dapo":
        W = 1 / torch.clamp(n_tok, min=1)
    elif cfg.aggregation == "dr_grpo":
        L = cfg.max_completion_length if cfg.max_completion_length is not None else T
        W = 1 / (n_seq * L)
    elif cfg.aggregation == "token_sum":
        W = torch.ones((), dtype=dtype, device=mask.device)
    elif cfg.aggregation == "seq_mean_token_sum":
        W = 1 / n_seq
    else:  # lambda_grpo
        lam = batch.lam.to(device=mask.device, dtype=torch.float64)
        if batch.group_lengths is None:  # contiguous groups of group_size rows
            f = lambda_grpo_weights(lengths.to(torch.float64), batch.group_size, lam, cfg.length_r)
        else:  # row i's group is group_lengths[i]; it is member group_index[i]
            G = batch.group_lengths.shape[1]
            f_all = lambda_grpo_weights(batch.group_lengths.reshape(-1).to(torch.float64), G, lam, cfg.length_r)
            f = f_all.view(B, G).gather(1, batch.group_index[:, None]).squeeze(1)
        seq_weight = f.to(dtype)
        W = seq_weight[:, None] / torch.clamp(n_tok, min=1)
    loss = poisoned((W * token_loss).sum(), batch.poison)  # the value rules' verdict (docs/math.md §10)

    # §6 metrics: means over the valid tokens of the local batch, no host sync
    with torch.no_grad():
        count = torch.clamp(local_tokens, min=1)

        def mean(v):
            return torch.where(mask, v.to(dtype), zero).sum() / count

        low, high = mean(clip_low), mean(clip_high)
        metrics = {"clip_frac_low": low, "clip_frac_high": high, "clip_frac": low + high, "ratio_mean": mean(rho)}
        if kl is not None:
            metrics["kl_mean"] = mean(kl)
        if entropy is not None:
            metrics["entropy_mean"] = mean(entropy)
        if cfg.surrogate == "vespo":
            metrics["phi_mean"] = mean(phi)
        if cfg.uses_lambda:
            metrics["lambda"] = batch.lam.detach().to(dtype)
        metrics["seq_weight"] = seq_weight.detach()
    tokens = None
    if per_token:
        with torch.no_grad():
            none = torch.zeros_like(token_loss)
            tokens = {"loss": token_loss, "ratio": torch.where(mask, rho, zero),
                      "kl": none if kl is None else torch.where(mask, kl, zero),
                      "entropy": none if entropy is None else entropy,
                      "clip_low": (clip_low & mask).to(dtype), "clip_high": (clip_high & mask).to(dtype),
                      "clip_dual": (clip_dual & mask).to(dtype)}
            tokens = {k: v.detach().to(out_dtype) for k, v in tokens.items()}
    return LossOutput(loss.to(out_dtype), {k: v.to(out_dtype) for k, v in metrics.items()}, tokens)


def reference_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, dtype=torch.float64):
    """log_softmax(logits / tau)[tokens] in `dtype`, returned in fp32 (float64 for float64 logits)."""
    logprobs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    out = logprobs.gather(-1, tokens.long().clamp(0, logits.shape[-1] - 1)[..., None]).squeeze(-1)
    return out.to(compute_dtype(logits.dtype))


def reference_packed_loss(logits: torch.Tensor, batch: Batch, cfg: LossConfig, out_dtype, per_token: bool,
                          dtype=torch.float64) -> LossOutput:
    """The reference for packed logits (N, V) (or hidden @ W^T, reference_linear_loss): per-token
    log-probs on the packed rows, padded explicitly into (B, T) by an autograd scatter, then the
    reference row math; gradients come back packed through the scatter; per-token outputs (N,)."""
    logp, ent = reference_vocab(logits, batch.vocab_tokens, batch.vocab_mask, cfg.temperature, cfg.needs_entropy,
                                dtype)
    out = reference_rows(batch.to_rows(logp), None if ent is None else batch.to_rows(ent), batch, cfg, out_dtype,
                         dtype, per_token)
    if out.per_token is not None:
        out = LossOutput(out.loss, out.metrics, {k: batch.to_vocab(v) for k, v in out.per_token.items()})
    return out
