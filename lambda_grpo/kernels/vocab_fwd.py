"""Forward vocab pass: per token logp = log_softmax(logits / tau)[token], lse, entropy.

Tokens on grid axis 0 (no 65 535 limit), one program per token, int64 row offsets, masked
vocab tiles. Masked-out tokens read nothing (not even their token id) and get zeros.
Reads the logits once; writes three fp32 numbers per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import vocab_launch
from ._launch import check_rows, check_vec, row_layout, zeros1
from ._vocab import flag_bad_token, load_token, lse_entropy, row_start


@triton.jit(do_not_specialize=["T", "check_ids"])
def vocab_fwd_kernel(logits_ptr, tokens_ptr, mask_ptr, logp_ptr, max_ptr, logs_ptr, ent_ptr, flag_ptr,
                     T, stride_batch, stride_row, V, inv_temp, check_ids,
                     BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    valid = tl.load(mask_ptr + pid) != 0
    if valid:
        row = row_start(logits_ptr, pid, T, stride_batch, stride_row)
        tok = load_token(tokens_ptr, pid, V)
        m, log_s, ent = lse_entropy(row, V, inv_temp, BLOCK_V, WITH_ENTROPY)
        flag_bad_token(tokens_ptr, pid, V, flag_ptr, check_ids)  # after the walk: nothing more live across it
        x_tok = tl.load(row + tok).to(tl.float32) * inv_temp
        tl.store(logp_ptr + pid, (x_tok - m) - log_s)
        tl.store(max_ptr + pid, m)
        tl.store(logs_ptr + pid, log_s)
        if WITH_ENTROPY:
            tl.store(ent_ptr + pid, ent)


def vocab_forward(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, temperature: float,
                  with_entropy: bool, id_flag: torch.Tensor = None):
    """logits (N, V) or (B, T, V) (N = B T; rows may be strided) fp32/bf16/fp16, tokens (N,)
    int64, mask (N,) bool. id_flag: as in vocab_fused.vocab_fused.

    Returns logp (N,) (the shape of mask: (B, T) for a (B, T) mask), lse (2, N) = [max, log sum
    exp(x - max)], entropy like logp or None; fp32;
    zeros where mask is False.
    """
    check_rows(logits)
    N, V, T, batch_stride, row_stride = row_layout(logits)
    check_vec(tokens, "tokens", N, torch.int64, logits.device)
    check_vec(mask, "mask", N, torch.bool, logits.device)
    logp = torch.zeros(mask.shape, device=logits.device, dtype=torch.float32)  # (N,), or (B, T) as the mask
    lse = torch.zeros(2, N, device=logits.device, dtype=torch.float32)
    ent = torch.zeros_like(logp) if with_entropy else None
    if id_flag is not None:
        check_vec(id_flag, "id_flag", 1, torch.bool, logits.device)
    if N > 0:
        cfg = vocab_launch(with_entropy)
        vocab_fwd_kernel[(N,)](logits, tokens, mask, logp, lse[0], lse[1], logp if ent is None else ent,
                               zeros1(torch.bool, logits.device) if id_flag is None else id_flag,
                               T, batch_stride, row_stride, V, 1.0 / temperature, int(id_flag is not None),
                               **cfg.kwargs())
    return logp, lse, ent
