"""Jit helpers over one token's vocabulary row, shared by the vocab kernels.

A row is walked in masked tiles of BLOCK_V, so any V works; each tile is upcast to fp32 right
after `tl.load` (bf16/fp16 arithmetic is never done in the narrow type), and all sums are
fp32. Row base pointers are built by the callers from int64 program ids.
"""

import triton
import triton.language as tl


@triton.jit
def lse_entropy(row_ptr, V, inv_temp, BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """Online logsumexp of x = logits * inv_temp over one row; entropy if asked.

    Keeps m (running max), s = sum exp(x - m) and u = sum exp(x - m) * (x - m). When m grows
    to m', exp(x - m') = alpha * exp(x - m) with alpha = exp(m - m'), and
    (x - m') = (x - m) + (m - m'), so u' = alpha * (u + s * (m - m')). Then
    lse = m + log s and H = lse - E[x] = log s - u / s. Centring at m keeps H accurate when
    the logits are large and the distribution is peaked (no lse - E[x] cancellation).
    Returns (m, log s, H), H 0 without WITH_ENTROPY: lse stays two numbers, so that a log-prob is
    formed as (x - m) - log s (plain torch's log_softmax order); m + log s in one fp32 number
    would lose |lse| 2^-24 of every log p (1e-5 relative in p at |x| ~ 200).
    """
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    u = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        vm = cols < V
        x = tl.load(row_ptr + cols, mask=vm, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        if WITH_ENTROPY:
            shift = tl.where(s > 0, m - m_new, 0.0)
            # the lanes past V hold x = -inf and e = 0: centre them at 0, not at -inf (0 * -inf is a
            # NaN that where() drops, but the interpreter reports it)
            u = alpha * (u + s * shift) + tl.sum(e * tl.where(vm, x - m_new, 0.0), 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    if WITH_ENTROPY:
        ent = log_s - u / s
    else:
        ent = tl.zeros([], tl.float32)
    return m, log_s, ent


@triton.jit
def write_grad(row_in, row_out, V, inv_temp, m, log_s, tok, g, gh, ent,
               BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    """dlogits_j = inv_temp * (g * (1[j = tok] - p_j) - gh * p_j * (log p_j + H)).

    g = dL/dlogp and gh = dL/dH of this token. With x = logits / tau,
    d logp / d x_j = 1[j = tok] - p_j and dH / dx_j = -p_j (log p_j + H); the chain rule
    through x multiplies by 1 / tau. row_out may equal row_in (in-place): each tile is read
    before it is written, by the same program.
    """
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        vm = cols < V
        x = tl.load(row_in + cols, mask=vm, other=0.0).to(tl.float32) * inv_temp
        logq = (x - m) - log_s
        p = tl.exp(logq)
        d = tl.where(cols == tok, g - g * p, -g * p)
        if WITH_ENTROPY:
            d -= gh * p * (logq + ent)
        tl.store(row_out + cols, (d * inv_temp).to(row_out.dtype.element_ty), mask=vm)


@triton.jit
def write_zero(row_out, V, BLOCK_V: tl.constexpr):
    """A masked token's gradient row is zero (also when writing in place over its logits)."""
    zero = tl.zeros([BLOCK_V], tl.float32).to(row_out.dtype.element_ty)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        tl.store(row_out + cols, zero, mask=cols < V)


@triton.jit
def row_start(base_ptr, pid, T, batch_stride, row_stride):
    """Pointer to vocabulary row `pid` (int64) = b T + t of logits laid out as (B, T, V) with
    strides (batch_stride, row_stride, 1); (N, V) logits pass T = N, batch_stride = 0."""
    return base_ptr + (pid // T) * batch_stride + (pid % T) * row_stride


@triton.jit
def load_token(tokens_ptr, pid, V):
    """The token id of row `pid`, clamped into [0, V): never an out-of-range read."""
    tok = tl.load(tokens_ptr + pid)
    return tl.minimum(tl.maximum(tok, 0), V - 1)


@triton.jit
def flag_bad_token(tokens_ptr, pid, V, flag_ptr, check_ids):
    """The value rule of a counted token id (docs/math.md §10) on the device: when check_ids, an
    id outside [0, V) sets the bool at flag_ptr (every such program stores the same True; the
    finish and scale kernels read it after this kernel)."""
    if check_ids != 0:
        tok = tl.load(tokens_ptr + pid)
        bad = (tok < 0) | (tok >= V)
        tl.store(flag_ptr, bad, mask=bad)
