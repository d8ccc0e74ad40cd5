"""The torch engine: the vocabulary passes of backend="torch" in plain torch ops (CPU and any device).

A leaf of the package: it knows nothing of autograd or of the custom ops (lambda_grpo/_ops.py
calls it). It walks the valid tokens in chunks of rows small enough to stay in cache; per chunk
one exp pass over the vocabulary (max, exp, sum) keeps only per-token fp32 state (logp, the
log-sum-exp, the entropy). Nothing of size (B*T, V) is allocated except the gradient itself.

- `vocab_forward`: logp, entropy, lse per token (the two-pass schedule's forward).
- `vocab_fused`: the same pass also writes dlogits, for losses whose d(loss)/d(logp_t) depends
  only on token t (no ratio-mode trace): the gradient rows are written while the softmax is
  still in cache, one exp pass for forward + backward (Liger-Kernel's chunked losses do the same).
- `vocab_backward`: the two-pass schedule's backward, p = exp(x - lse) recomputed per chunk.

VJP of the vocab pass, per token with x = logits / tau, p = softmax(x), logp = x_y - lse,
H = lse - sum_j p_j x_j, and upstream coefficients gl = dL/dlogp, gh = dL/dH:
    dL/dx_j = gl (1[j = y] - p_j) - gh p_j (log p_j + H)
    dL/dlogits_j = dL/dx_j / tau
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch

from .config import LossConfig
from ._batch import Batch, compute_dtype
from ._rowmath import FusedInputs, RowPass, TokenConstants, broadcast_rows, row_pass as _row_pass, token_terms

# Rows per chunk are chosen so a chunk holds about this many elements (fp32: 2 MiB), small
# enough to stay in a core's cache between the max, exp and sum sweeps. Measured on the 2-core
# CPU of this project at V = 151 936: 4-8 rows per chunk were fastest.
CHUNK_ELEMENTS = 1 << 19
_PAGE = mmap.PAGESIZE

# exp(t) is computed as exp2(t * log2(e)) with t = x - max or x - lse already formed: torch's
# CPU exp2 kernel is ~3x faster than its exp (measured here, fp32 in cache: exp 0.84-0.91
# ns/element, exp2 0.32, the extra multiply 0.05), and exp was the largest part of every pass.
# Both are Sleef kernels with 1-ulp accuracy; t is formed first (as before), so the only new
# rounding is one ulp of t * log2(e): a relative error of |t| * 2^-24 in exp(t), the size of
# the rounding t itself already carries.
LOG2E = 1.4426950408889634


class ChunkStats(NamedTuple):
    """What one exp pass over a chunk of rows leaves behind (all per row unless noted)."""

    xm: torch.Tensor  # (n, V) x - max(x), in the caller's buffer
    e: torch.Tensor  # (n, V) exp(xm)
    se: torch.Tensor  # sum e
    mx: torch.Tensor  # max of x
    lse_shift: torch.Tensor  # log se
    logp: torch.Tensor  # xm[y] - log se
    entropy: Optional[torch.Tensor]  # log se - sum(e * xm) / se, or None


def _rows_per_chunk(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def _runs(flat_mask: torch.Tensor) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """Maximal runs [start, end) of valid and of masked rows (one host sync, O(B*T))."""
    m = flat_mask.to(torch.int8).cpu()
    edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), m, torch.zeros(1, dtype=torch.int8)]))
    starts = (edges == 1).nonzero().squeeze(1).tolist()
    ends = (edges == -1).nonzero().squeeze(1).tolist()
    valid = list(zip(starts, ends))
    gaps, prev = [], 0
    for a, b in valid:
        if a > prev:
            gaps.append((prev, a))
        prev = b
    if prev < m.numel():
        gaps.append((prev, m.numel()))
    return valid, gaps


def _chunks(runs: List[Tuple[int, int]], rows_per: int) -> Iterator[Tuple[int, int]]:
    """Contiguous row ranges of at most rows_per rows: the chunks are plain slices, no gather."""
    for a, b in runs:
        for s in range(a, b, rows_per):
            yield s, min(s + rows_per, b)


def _scaled(src: torch.Tensor, tau: float, out: torch.Tensor) -> torch.Tensor:
    """out = src / tau in the compute dtype (a true division: x * (1/tau) would round 1/tau)."""
    out.copy_(src)
    if tau != 1.0:
        out.div_(tau)
    return out


def _chunk_stats(src, targets, tau, want_entropy, buf, e_out) -> ChunkStats:
    """One exp pass over a chunk of rows src (n, V); xm lands in buf, e = exp(xm) in e_out."""
    n = src.shape[0]
    xm = buf[:n]
    if src.dtype == xm.dtype and tau == 1.0:
        mx = src.amax(dim=1, keepdim=True)
        torch.sub(src, mx, out=xm)
    else:
        _scaled(src, tau, xm)
        mx = xm.amax(dim=1, keepdim=True)
        xm.sub_(mx)
    e = torch.mul(xm, LOG2E, out=e_out).exp2_()
    se = e.sum(dim=1)
    lse_shift = torch.log(se)
    logp = xm.gather(1, targets[:, None]).squeeze(1) - lse_shift
    H = None
    if want_entropy:
        # vecdot reduces pairwise; a bmm here accumulates serially and loses ~1e-4 at V = 151 936
        H = lse_shift - torch.linalg.vecdot(e, xm) / se
    return ChunkStats(xm, e, se, mx.squeeze(1), lse_shift, logp, H)


def _write_grad(xm, p, targets, gl, gh, H, lse_shift, tau, out):
    """Turn p (n, V) in place into dL/dlogits rows and store them in `out` (logits dtype).

    xm = x - c for a per-row constant c with log p = xm - lse_shift (only read with entropy).
    dL/dx_j = gl (1[j = y] - p_j) - gh p_j (log p_j + H); divided by tau for dL/dlogits."""
    if gh is None:
        p.mul_((-gl / tau)[:, None])
    else:
        # -p (gl + gh (log p + H)) = -p (gh xm + (gl + gh (H - lse_shift)))
        a = (gl + gh * (H - lse_shift))[:, None]
        torch.mul(xm, gh[:, None], out=xm)
        xm.add_(a)
        p.mul_(xm).mul_(-1.0 / tau)
    p.scatter_add_(1, targets[:, None], (gl / tau)[:, None])
    if out.data_ptr() != p.data_ptr():
        out.copy_(p)


def _for_each_chunk(chunks: List[tuple], body, make_buffers, device: torch.device) -> None:
    """Run body(*chunk, buffers) for each chunk (a tuple that starts with the rows s, e).

    On a multi-threaded CPU the chunks are shared by torch.get_num_threads() Python workers,
    each running its ops single-threaded on its own buffers (torch releases the GIL inside
    ops). Chunks write disjoint rows, so no locking is needed. Why not leave the parallelism
    to torch's OpenMP: a chunk's ops are ~1 ms each, so every op is a parallel region with a
    barrier, and on a CPU that other jobs share a barrier waits for a descheduled thread
    (measured here: 26 s instead of 0.8 s for one step at N = 2048, V = 151 936 with a second
    job running). Independent workers have no barrier. They take the next chunk from one
    shared iterator (under the GIL `next` on a list iterator is atomic), so a worker that the
    machine's other jobs slow down takes fewer chunks instead of holding the others back.

    Thread counts: each worker sets its own intra-op count to 1; the caller's is not changed.
    torch.set_num_threads(n) sets the calling thread's OpenMP and MKL counts, which are
    per-thread (verified with torch 2.13: after a worker thread set 1, the caller's
    torch.__config__.parallel_info() still shows 2 for at::get_num_threads,
    omp_get_max_threads and mkl_get_max_threads), and also a process-wide value that threads
    started later begin with (a thread started after the worker's call showed 1). So after
    the workers end the caller re-applies its own, unchanged count, which restores that
    process-wide value and changes nothing else.

    Grad mode and inference mode are thread-local: the workers run without grad (the body only
    writes buffers) and in the caller's inference mode, so that tensors the caller made under
    torch.inference_mode() may be written by them.
    """
    nt = torch.get_num_threads() if device.type == "cpu" else 1
    nt = min(nt, len(chunks))
    if nt <= 1:
        bufs = make_buffers()
        for item in chunks:
            body(*item, bufs)
        return
    inference = torch.is_inference_mode_enabled()
    todo = iter(chunks)

    def work():
        torch.set_num_threads(1)
        with torch.inference_mode(inference), torch.no_grad():
            bufs = make_buffers()
            for item in todo:
                body(*item, bufs)

    try:
        with ThreadPoolExecutor(max_workers=nt) as pool:
            for f in [pool.submit(work) for _ in range(nt)]:
                f.result()
    finally:
        torch.set_num_threads(torch.get_num_threads())  # the caller's own count: see above


def _buffers(rows_per: int, n_rows: int, V: int, dtype, device):
    n = max(1, min(rows_per, n_rows))
    return torch.empty(n, V, dtype=dtype, device=device), torch.empty(n, V, dtype=dtype, device=device)


def _new_grad(logits2d: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.empty_like(logits2d) if out is None else out


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_madvise = None  # libc madvise, False where unavailable


def _prefault(t: torch.Tensor) -> None:
    """Map t's pages writable now, in one system call: madvise(MADV_POPULATE_WRITE).

    The gradient is a new buffer in every step (a fresh mapping for a large tensor), so each of
    its 4 KiB pages faults when first written. Faulting a chunk's rows in one call just before
    they are written costs ~22 % less than taking the faults one by one (measured here: 1.2 GB,
    one thread, 494 -> 383 ms of CPU time), and the kernel's zeroed pages are then still in
    cache when the chunk writes them. Contents never change (pages already mapped are left as
    they are; new ones are zero, as a first write would find them). Does nothing where the call
    is not available (not Linux, kernel < 5.14) or fails."""
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.madvise
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                pass
    if not _madvise or t.device.type != "cpu" or t.numel() == 0:
        return
    p = t.data_ptr()
    a, b = p & ~(_PAGE - 1), p + t.numel() * t.element_size()
    if _madvise(a, b - a, _MADV_POPULATE_WRITE) != 0 and ctypes.get_errno() == errno.EINVAL:
        _madvise = False  # the kernel does not know MADV_POPULATE_WRITE


def _grad_chunks(runs, gaps, rows_per: int) -> List[tuple]:
    """Work items of a pass that writes the gradient: (s, e, True) chunks of valid rows, then
    (s, e, False) chunks of masked rows (zeroed by the workers too, in parallel)."""
    return [(s, e, True) for s, e in _chunks(runs, rows_per)] + [(s, e, False) for s, e in _chunks(gaps, 4 * rows_per)]


# --------------------------------------------------------------------------------------------
# The engine interface (the Triton engine, lambda_grpo/_vocab_triton.py, has the same one)
# --------------------------------------------------------------------------------------------
def vocab_forward(logits2d: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, tau: float,
                  want_entropy: bool, want_lse: bool):
    """logits2d (N, V), tokens (N,) int64, mask (N,) bool -> (logp (N,), entropy (N,) or None,
    lse (2, N) or None) in the compute dtype; zeros where mask is False (nothing is read there).

    lse holds the log-sum-exp of x = logits / tau as two numbers, [max x, log sum exp(x - max)]:
    the backward forms log p = (x - max) - log sum, as plain torch's log_softmax does. One fp32
    number max + log sum would lose |lse| 2^-24 of log p (1e-5 relative in p at |x| ~ 200)."""
    tokens, mask = tokens.reshape(-1), mask.reshape(-1)  # (B, T) of a padded batch: indexed flat
    N, V = logits2d.shape
    dtype = compute_dtype(logits2d.dtype)
    device = logits2d.device
    logp = torch.zeros(N, dtype=dtype, device=device)
    ent = torch.zeros(N, dtype=dtype, device=device) if want_entropy else None
    lse = torch.zeros(2, N, dtype=dtype, device=device) if want_lse else None
    runs, _ = _runs(mask)
    rows_per = _rows_per_chunk(V)

    def body(s, e, bufs):
        st = _chunk_stats(logits2d[s:e], tokens[s:e], tau, want_entropy, bufs[0], bufs[1][: e - s])
        logp[s:e] = st.logp
        if ent is not None:
            ent[s:e] = st.entropy
        if lse is not None:
            lse[0, s:e] = st.mx
            lse[1, s:e] = st.lse_shift

    _for_each_chunk(list(_chunks(runs, rows_per)), body,
                    lambda: _buffers(rows_per, sum(b - a for a, b in runs), V, dtype, device), device)
    return logp, ent, lse


def vocab_fused(logits2d: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, tau: float, want_entropy: bool,
                inputs: FusedInputs, cfg: LossConfig, out: Optional[torch.Tensor] = None):
    """One exp pass that also writes dlogits (for an upstream gradient of 1) into `out` (default:
    a new (N, V) tensor; `out=logits2d` overwrites the logits). The per-token coefficient comes
    from `_rowmath.token_terms`, the same elementwise math as the row pass (z = x = logp - old).
    Returns (logp, entropy or None, dlogits)."""
    tokens, mask = tokens.reshape(-1), mask.reshape(-1)  # (B, T) of a padded batch: indexed flat
    N, V = logits2d.shape
    dtype = compute_dtype(logits2d.dtype)
    device = logits2d.device
    logp_all = torch.zeros(N, dtype=dtype, device=device)
    ent = torch.zeros(N, dtype=dtype, device=device) if want_entropy else None
    runs, gaps = _runs(mask)
    dlogits = _new_grad(logits2d, out)
    fresh = dlogits.data_ptr() != logits2d.data_ptr()  # a new buffer: its pages fault when first written
    # exp lands straight in the gradient rows when they have the compute dtype, also when they
    # are the logits (inplace): _chunk_stats has read the chunk's logits into its buffer (xm)
    # before it writes e
    direct = dlogits.dtype == dtype
    rows_per = _rows_per_chunk(V)
    # flat (N,) views of the inputs ((B, T) of a padded batch, indexed by vocabulary row; W per row spread)
    A, W, c, old_all, ref_all = (None if v is None else broadcast_rows(v, inputs.A).reshape(-1) for v in inputs)

    def body(s, e, valid, bufs):
        if fresh:
            _prefault(dlogits[s:e])
        if not valid:
            dlogits[s:e].zero_()
            return
        buf, ebuf = bufs
        tg = tokens[s:e]
        st = _chunk_stats(logits2d[s:e], tg, tau, want_entropy, buf, dlogits[s:e] if direct else ebuf[: e - s])
        logp = st.logp
        logp_all[s:e] = logp
        if ent is not None:
            ent[s:e] = st.entropy
        old = logp if old_all is None else old_all[s:e]
        terms = token_terms(logp - old, logp, None if ref_all is None else ref_all[s:e], st.entropy, A[s:e],
                            W[s:e], None if c is None else c[s:e], cfg)
        p = st.e.mul_((1.0 / st.se)[:, None])
        _write_grad(st.xm, p, tg, terms.g_z + terms.g_logp, terms.g_entropy, st.entropy, st.lse_shift, tau,
                    dlogits[s:e])

    _for_each_chunk(_grad_chunks(runs, gaps, rows_per), body,
                    lambda: _buffers(rows_per, sum(b - a for a, b in runs), V, dtype, device), device)
    return logp_all, ent, dlogits


def vocab_backward(logits2d: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, lse: torch.Tensor,
                   gl: torch.Tensor, gh: Optional[torch.Tensor], H: Optional[torch.Tensor], tau: float,
                   scale: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dL/dlogits (N, V) in the logits dtype from the saved lse (2, N) = [max, log sum] (see
    vocab_forward) and the per-token coefficients
    scale * gl = dL/dlogp, scale * gh = dL/dH (gh, H None without an entropy term; scale the
    upstream gradient, 0-d); masked rows get zeros. `out=logits2d` writes the gradient over the
    logits (each chunk is read before it is written)."""
    tokens, mask = tokens.reshape(-1), mask.reshape(-1)  # (B, T) of a padded batch: indexed flat
    N, V = logits2d.shape
    mx, log_s = lse[0], lse[1]  # (2, N), or a pair of (N,)
    dtype = mx.dtype
    scale = scale.to(dtype)
    gl = gl * scale
    gh = None if gh is None else gh * scale
    runs, gaps = _runs(mask)
    dlogits = _new_grad(logits2d, out)
    fresh = dlogits.data_ptr() != logits2d.data_ptr()
    rows_per = _rows_per_chunk(V)
    direct = dlogits.dtype == dtype

    def body(s, e, valid, bufs):
        src, dst, n = logits2d[s:e], dlogits[s:e], e - s
        if fresh:
            _prefault(dst)
        if not valid:
            dst.zero_()
            return
        if direct and gh is None:
            # log p = x - lse formed in the gradient rows themselves and turned into p there (each
            # element is read before it is written, so this holds when they are the logits too)
            if tau == 1.0 and src.dtype == dtype:
                logq = torch.sub(src, mx[s:e, None], out=dst).sub_(log_s[s:e, None])
            else:
                logq = _scaled(src, tau, dst).sub_(mx[s:e, None]).sub_(log_s[s:e, None])
            p = logq.mul_(LOG2E).exp2_()
        else:
            # the entropy term needs log p next to p (or p needs the compute dtype): log p in a buffer
            logq = _scaled(src, tau, bufs[0][:n]).sub_(mx[s:e, None]).sub_(log_s[s:e, None])
            p = torch.mul(logq, LOG2E, out=dst if direct else bufs[1][:n]).exp2_()
        _write_grad(logq, p, tokens[s:e], gl[s:e], None if gh is None else gh[s:e],
                    None if H is None else H[s:e], torch.zeros_like(gl[s:e]), tau, dst)

    n_valid = sum(b - a for a, b in runs)
    _for_each_chunk(_grad_chunks(runs, gaps, rows_per), body,
                    lambda: (None, None) if direct and gh is None else _buffers(rows_per, n_valid, V, dtype,
                                                                                logits2d.device), logits2d.device)
    return dlogits


def _single_threaded(fn, *args):
    """fn(*args) run by a helper thread whose intra-op count is 1 (the caller's is not changed,
    see _for_each_chunk), without grad and in the caller's inference mode; on one CPU thread
    or off the CPU, directly.

    For the O(B*T) row math: its ops are a few microseconds each, yet each one above torch's
    grain size is an OpenMP region with a barrier, and on a CPU that other jobs share the
    barrier waits for a descheduled thread. Measured here (load ~5 on 2 cores, N = 2 048,
    lambda_grpo with trace="both"): 143-153 ms for the row pass with the caller's 2 threads,
    3 ms with one."""
    if torch.get_num_threads() <= 1 or args[0].device.type != "cpu":
        return fn(*args)
    inference = torch.is_inference_mode_enabled()

    def run():
        torch.set_num_threads(1)
        with torch.inference_mode(inference), torch.no_grad():
            return fn(*args)

    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(run).result()
    finally:
        torch.set_num_threads(torch.get_num_threads())


def row_pass(logp: torch.Tensor, entropy: Optional[torch.Tensor], batch: Batch, cfg: LossConfig,
             consts: TokenConstants, per_token: bool = False, want_coef: bool = True) -> RowPass:
    """This engine's row math is `_rowmath.row_pass` (want_coef: its coefficients are always
    made), run single-threaded on the CPU (see _single_threaded)."""
    return _single_threaded(_row_pass, logp, entropy, batch, cfg, consts, per_token)


# validation checks the token ids (the torch engine gathers with them)
CHECKS_IDS = False
# the fused schedule runs the row pass (no `finish_fused`: its vocab_fused writes no terms)
finish_fused = None
# the op layer applies the value rules' poison (lambda_grpo/_compute.py:poisoned)
APPLIES_POISON = False
# (N, V) logits only: a (B, T, V) slice that cannot be viewed as (N, V) is copied by the caller
ROWS_3D = False
# an upstream gradient is applied by reading it on the host (lambda_grpo/_ops.py:_upstream): on a CPU
# that read costs nothing, and d itself is the gradient when g == 1 (no pass over it)
RESCALE_IN_PLACE = False
# lambda-GRPO's group weights: the torch row math's own (lambda_grpo/_rowmath.py)
group_weights = None


def scale_(d: torch.Tensor, mask: torch.Tensor, g: torch.Tensor, poison: Optional[torch.Tensor] = None
           ) -> torch.Tensor:
    """In place: d *= g (a 0-d tensor; masked rows are zero already), NaN under `poison`. One host
    read of g."""
    if poison is not None:
        g = g * torch.where(poison, float("nan"), 1.0)
    if not bool(g == 1):
        d.mul_(g.to(d.dtype))
    return d
