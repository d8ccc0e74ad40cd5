"""Input validation shared by every public entry point (docs/math.md §10).

Shapes, dtypes, devices and Python values are checked on the host: each rule raises
``ValueError`` naming the argument with the expected and the actual value.

The *contents* of tensors (token ids in [0, V) where counted, a non-bool mask's 0/1 values,
`group_lengths` / `group_index` against the rows, tensor normalisers) are never read on the host
in a call: that would be a host-device synchronisation per training step. They are checked on the
device instead, by a few small reductions whose result, when a rule fails, makes the loss and its
gradients NaN (`Batch.poison`); nothing is ever read out of bounds (ids are clamped into [0, V),
group indices into [0, G)). `LossOutput.input_errors` names the failed rules when read (that read
is the one sync, and only when asked), and `LossOutput.check_inputs()` raises them. For debugging,
`lambda_grpo.check_values()` (a context manager) or the environment variable
LAMBDA_GRPO_CHECK_VALUES=1 turns the same rules into host checks that raise ``ValueError`` in the
call. Value checks are skipped while torch.compile traces (the device rules stay in the graph).

Token ids of any integer dtype are accepted (uint8/uint16/int32 ... from numpy or a tokenizer);
the backends compute on int64 copies. Tensors on the "meta" device have no values to check or
compute with: they are refused with a ValueError naming the first such argument.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from typing import List, Optional

import torch

from .config import LossConfig
from ._batch import Batch, as_dtype, compute_dtype  # noqa: F401  (re-exported)
from ._packed import PACKED_HINT, unpack_inputs

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BACKENDS = ("auto", "reference", "torch", "triton")



def fail(name: str, expected: str, actual) -> None:
    raise ValueError(_message(name, expected, actual))


def _message(name: str, expected: str, actual) -> str:
    return f"{name}: expected {expected}, got {actual}"


_CHECK_VALUES = [os.environ.get("LAMBDA_GRPO_CHECK_VALUES", "0") not in ("", "0")]


@contextlib.contextmanager
def check_values(enabled: bool = True):
    """Inside this context, the value rules of the inputs (token ids in [0, V) where counted, 0/1
    mask values, group_lengths / group_index) are checked on the host and raise ``ValueError`` in
    the call, instead of making the loss NaN (the default, which never synchronises with the
    device; docs/math.md §10). For debugging: each check reads the inputs back from the device.
    The environment variable LAMBDA_GRPO_CHECK_VALUES=1 sets the default for the process."""
    before = _CHECK_VALUES[0]
    _CHECK_VALUES[0] = bool(enabled)
    try:
        yield
    finally:
        _CHECK_VALUES[0] = before


def _host_checks() -> bool:
    return _CHECK_VALUES[0] and not _compiling()


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        fail("backend", f"one of {BACKENDS}", repr(backend))


def check_has_data(x, name: str) -> None:
    """Refuse a tensor on the meta device (shape only, no values): validation reads values
    (token range, 0/1 mask) and every backend computes with them."""
    if isinstance(x, torch.Tensor) and x.is_meta:
        fail(name, "a tensor with values (cpu, cuda, ...)", "a tensor on the meta device (shape only)")


def check_logits_tokens(logits, tokens, name_logits="logits", name_tokens="tokens", mask=None, packed=False) -> None:
    """logits (B, T, V) and tokens (B, T); packed=True (cu_seqlens given, or the packed layout of
    token_logprobs): logits (N, V) and tokens (N,)."""
    if not isinstance(logits, torch.Tensor):
        fail(name_logits, "a torch.Tensor", type(logits).__name__)
    check_has_data(logits, name_logits)
    if packed and logits.dim() != 2:
        fail(name_logits, f"shape (N, V) with 2 dims {PACKED_HINT}", f"shape {tuple(logits.shape)}")
    if not packed and logits.dim() != 3:
        fail(name_logits, "shape (B, T, V) with 3 dims", f"shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        fail(name_logits, "dtype float32, bfloat16, float16 or float64", logits.dtype)
    lead, V = tuple(logits.shape[:-1]), logits.shape[-1]
    if V < 1:
        fail(name_logits, "V >= 1", f"V = {V}")
    if not isinstance(tokens, torch.Tensor):
        fail(name_tokens, "a torch.Tensor", type(tokens).__name__)
    if tuple(tokens.shape) != lead:
        fail(name_tokens, f"shape {lead} ({'N' if packed else 'B, T'} of logits)", f"shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        fail(name_tokens, "an integer dtype (int64, int32, uint16, ...)", tokens.dtype)
    if tokens.device != logits.device:
        fail(name_tokens, f"device {logits.device} (that of logits)", tokens.device)
    if _host_checks():
        _raise(token_error(tokens, mask, V, name_tokens))


# --------------------------------------------------------------------------------------------
# Value rules: each returns the error message (reading the values on the host) or None. They
# raise in the call under check_values(); otherwise the device rules below poison the loss and
# LossOutput.input_errors runs these when the user reads it.
# --------------------------------------------------------------------------------------------
def _raise(msg: Optional[str]) -> None:
    if msg is not None:
        raise ValueError(msg)


def token_error(tokens: torch.Tensor, mask: Optional[torch.Tensor], V: int, name: str = "tokens") -> Optional[str]:
    """Ids in [0, V) where mask is set (everywhere when mask is None)."""
    if tokens.numel() == 0:
        return None
    # min/max are not implemented for every integer dtype (uint16/32/64): check an int64 copy
    ids = tokens if tokens.dtype == torch.int64 else tokens.long()
    sel = ids if mask is None else ids[mask]
    if sel.numel() == 0:
        return None
    lo, hi = int(sel.min()), int(sel.max())
    if lo >= 0 and hi < V:
        return None
    if lo < 0 and tokens.dtype == torch.uint64:  # ids >= 2**63 wrapped in the int64 copy
        return _message(name, f"ids in [0, {V}) where counted", "uint64 ids >= 2**63")
    return _message(name, f"ids in [0, {V}) where counted", f"ids in [{lo}, {hi}]")


def mask_error(mask: torch.Tensor) -> Optional[str]:
    """A non-bool mask holds only 0 and 1."""
    if mask.dtype == torch.bool or mask.numel() == 0:
        return None
    ok = (mask == 0) | (mask == 1)
    if bool(ok.all()):
        return None
    where = tuple(int(i) for i in (~ok).nonzero()[0])
    return _message("mask", "bool or 0/1 values", f"value {mask[where].item()!r} at index {where}")


def group_error(gl: torch.Tensor, gi: torch.Tensor, group_size: int, mask: torch.Tensor) -> Optional[str]:
    """group_lengths >= 0, group_index in [0, G), group_lengths[i, group_index[i]] = n_i."""
    if gl.shape[0] == 0:
        return None
    if bool((gl < 0).any()):
        return _message("group_lengths", "lengths >= 0", f"values in [{int(gl.min())}, {int(gl.max())}]")
    if bool((gi < 0).any()) or bool((gi >= group_size).any()):
        return _message("group_index", f"indices in [0, {group_size})", f"values in [{int(gi.min())}, {int(gi.max())}]")
    own = gl.gather(1, gi[:, None]).squeeze(1)
    n = mask.sum(dim=1)
    bad = (own != n).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        return _message("group_lengths", f"group_lengths[i, group_index[i]] = n_i, the row's number of valid tokens "
                        f"(row {i}: n_i = {int(n[i])})", int(own[i]))
    return None


def safe_ids(tokens: torch.Tensor, V: int):
    """(int64 ids clamped into [0, V), bool of the same shape: where the id was out of range), on
    the device: no engine ever reads out of bounds, and a bad id poisons the result."""
    ids = tokens if tokens.dtype == torch.int64 else tokens.long()
    safe = ids.clamp(0, max(V - 1, 0))  # uint64 ids >= 2**63 wrap to negative int64: clamped, and bad
    return safe, safe != ids


def _value_rules(tokens: torch.Tensor, mask: torch.Tensor, V: int, raw_mask: torch.Tensor,
                 ids_in_kernels: bool = False):
    """(safe ids, the _Values record) of an entry point with token ids: the device rules of the
    token range where counted and of a non-bool mask's 0/1 values. ids_in_kernels: the engine's
    kernels check the ids (Engine.CHECKS_IDS): the ids are handed over as int64, unclamped, and
    the poison is a 0-d bool of this call's own that the kernels set (False, or the mask rule)."""
    if ids_in_kernels:
        ids = tokens if tokens.dtype == torch.int64 else tokens.long()
        poison = _mask_poison(raw_mask)  # a new tensor: the kernels may write into it
        if poison is None:
            poison = torch.zeros((), dtype=torch.bool, device=tokens.device)
        return ids, _Values(tokens, mask, V, raw_mask, poison)
    ids, bad = safe_ids(tokens, V)
    poison = (bad & mask).any() if ids.numel() else None
    return ids, _Values(tokens, mask, V, raw_mask, _any(poison, _mask_poison(raw_mask)))


class _Values:
    """The inputs whose contents the value rules read, kept for `LossOutput.input_errors`, and the
    device poison of the rules so far (a 0-d bool tensor, or None when no rule applies)."""

    __slots__ = ("tokens", "mask", "V", "raw_mask", "poison", "groups")

    def __init__(self, tokens, mask, V, raw_mask, poison):
        self.tokens, self.mask, self.V, self.raw_mask, self.poison = tokens, mask, V, raw_mask, poison
        self.groups = None  # (group_lengths, group_index, G, mask (B, T)) when given

    def errors(self) -> List[str]:
        """The failed value rules (reads the inputs on the host)."""
        found = []
        if self.tokens is not None:
            found.append(token_error(self.tokens, self.mask, self.V))
        if self.raw_mask is not None:
            found.append(mask_error(self.raw_mask))
        if self.groups is not None:
            found.append(group_error(*self.groups))
        return [m for m in found if m is not None]


def _any(*flags) -> Optional[torch.Tensor]:
    flags = [f for f in flags if f is not None]
    if not flags:
        return None
    out = flags[0]
    for f in flags[1:]:
        out = out | f
    return out


def _per_token(x, name: str, B: int, T: int, device, dtype, allow_seq: bool = False, what: str = "logits"):
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        fail(name, "a torch.Tensor", type(x).__name__)
    shape = x.shape
    if shape != (B, T) and not (allow_seq and shape == (B,)):
        want = f"({B}, {T})" + (f" or ({B},)" if allow_seq else "")
        fail(name, f"shape {want}", f"shape {tuple(shape)}")
    if not x.dtype.is_floating_point:
        fail(name, "a floating dtype", x.dtype)
    if x.device != device:
        fail(name, f"device {device} (that of {what})", x.device)
    if x.requires_grad:
        x = x.detach()
    x = as_dtype(x, dtype)
    if x.dim() == 1:
        x = x[:, None].expand(B, T)
    return x


def _normaliser(x, name: str, device, dtype):
    """A global normaliser as a 0-d tensor in the compute dtype, or None (= the local count).

    A Python number must be finite and > 0 (checked here, it raises). A tensor's value is not
    read on the host (that would be a sync per call): a value that is not finite and > 0
    (0, negative, inf, nan) becomes NaN on the device, so that the loss and d(lambda), which
    divide by it, are NaN instead of a silent finite wrong number (issue 8, finding 8).
    Values in (0, 1) are legal and, as the local counts, clamped to 1 where they divide.
    """
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            fail(name, "an int or a 0-d tensor", f"tensor of shape {tuple(x.shape)}")
        if x.dtype == torch.bool or x.dtype.is_complex:
            fail(name, "a 0-d tensor of a real (integer or floating) dtype", x.dtype)
        check_has_data(x, name)
        if x.device != device and x.device.type != "cpu":
            fail(name, f"device {device} or cpu", x.device)
        v = x.detach().reshape(()).to(device=device, dtype=dtype)
        return torch.where(torch.isfinite(v) & (v > 0), v, torch.full_like(v, float("nan")))
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or not x > 0:
        fail(name, "None, a finite number > 0 or a 0-d tensor", repr(x))
    return torch.tensor(float(x), device=device, dtype=dtype)


def validate(
    logits,
    tokens,
    mask,
    advantages,
    group_size,
    old_logp,
    ref_logp,
    lam,
    config,
    num_tokens,
    num_sequences,
    group_lengths=None,
    group_index=None,
    token_weights=None,
    cu_seqlens=None,
    ids_in_kernels: bool = False,
) -> Batch:
    """Check every docs/math.md §10 rule for the entry points from logits and return normalised inputs.
    With cu_seqlens (packed inputs): logits (N, V), every per-token input (N,); the Batch holds the
    (B, T_max) row layout of the per-token tensors and `packed_pos` (lambda_grpo/_packed.py).
    ids_in_kernels: leave the value rule of the token ids to the engine's kernels (Batch.ids_unchecked)."""
    if not isinstance(config, LossConfig):
        fail("config", "a lambda_grpo.LossConfig", type(config).__name__)
    if isinstance(logits, torch.Tensor):
        check_has_data(logits, "logits")  # before the mask's value check reads values
    if not isinstance(mask, torch.Tensor):
        fail("mask", "a torch.Tensor", type(mask).__name__)
    raw_mask = mask
    if cu_seqlens is not None:
        if isinstance(logits, torch.Tensor) and logits.dim() == 2:
            _check_packed_mask(mask, logits.shape[0], logits.device, "logits")
        mask = _bool_mask(mask)
        check_logits_tokens(logits, tokens, mask=mask, packed=True)
        V = logits.shape[-1]
        ids, values = _value_rules(tokens, mask, V, raw_mask, ids_in_kernels)
        batch = _validate_packed(logits, ids, mask, advantages, group_size, old_logp, ref_logp, lam, config,
                                 num_tokens, num_sequences, group_lengths, group_index, token_weights, cu_seqlens,
                                 logits.shape[0], logits.device, compute_dtype(logits.dtype), "logits", values)
        batch.ids_unchecked = ids_in_kernels
        return batch
    if isinstance(logits, torch.Tensor) and logits.dim() == 3 and tuple(mask.shape) != tuple(logits.shape[:2]):
        fail("mask", f"shape {tuple(logits.shape[:2])} (B, T of logits)", f"shape {tuple(mask.shape)}")
    if isinstance(logits, torch.Tensor) and mask.device != logits.device:
        fail("mask", f"device {logits.device} (that of logits)", mask.device)
    mask = _bool_mask(mask)
    check_logits_tokens(logits, tokens, mask=mask)
    B, T, V = logits.shape
    ids, values = _value_rules(tokens, mask, V, raw_mask, ids_in_kernels)
    batch = _validate_rows(logits, ids, mask, advantages, group_size, old_logp, ref_logp, lam, config,
                           num_tokens, num_sequences, group_lengths, group_index, token_weights, B, T, logits.device,
                           compute_dtype(logits.dtype), "logits", values)
    batch.ids_unchecked = ids_in_kernels
    return batch


def validate_logprobs(logp, entropy, mask, advantages, group_size, old_logp, ref_logp, lam, config, num_tokens,
                      num_sequences, group_lengths=None, group_index=None, token_weights=None,
                      cu_seqlens=None) -> Batch:
    """The same rules for the entry point from per-token log-probs (B, T); returns a Batch
    without logits. `entropy` (B, T) is required iff the config uses entropy. With cu_seqlens:
    logp, entropy and every per-token input (N,) (the caller pads logp and entropy into the row
    layout with `_packed.to_rows(..., batch.packed_pos, B, T)`)."""
    if not isinstance(config, LossConfig):
        fail("config", "a lambda_grpo.LossConfig", type(config).__name__)
    if not isinstance(logp, torch.Tensor):
        fail("logp", "a torch.Tensor", type(logp).__name__)
    check_has_data(logp, "logp")
    packed = cu_seqlens is not None
    if logp.dim() != (1 if packed else 2):
        fail("logp", f"shape (N,) with 1 dim {PACKED_HINT}" if packed else "shape (B, T) with 2 dims",
             f"shape {tuple(logp.shape)}")
    if logp.dtype not in FLOAT_DTYPES:
        fail("logp", "dtype float32, bfloat16, float16 or float64", logp.dtype)
    shape = tuple(logp.shape)
    if not isinstance(mask, torch.Tensor):
        fail("mask", "a torch.Tensor", type(mask).__name__)
    if tuple(mask.shape) != shape:
        fail("mask", f"shape {shape} (that of logp)", f"shape {tuple(mask.shape)}")
    if mask.device != logp.device:
        fail("mask", f"device {logp.device} (that of logp)", mask.device)
    raw_mask = mask
    mask = _bool_mask(mask)
    values = _Values(None, None, 0, raw_mask, _mask_poison(raw_mask))
    if config.needs_entropy and entropy is None:
        fail("entropy", f"a {shape} tensor because the config uses entropy (entropy_coef = "
             f"{config.entropy_coef}, compute_entropy = {config.compute_entropy})", None)
    if entropy is not None:
        if not isinstance(entropy, torch.Tensor):
            fail("entropy", "a torch.Tensor", type(entropy).__name__)
        if tuple(entropy.shape) != shape:
            fail("entropy", f"shape {shape} (that of logp)", f"shape {tuple(entropy.shape)}")
        if not entropy.dtype.is_floating_point:
            fail("entropy", "a floating dtype", entropy.dtype)
        if entropy.device != logp.device:
            fail("entropy", f"device {logp.device} (that of logp)", entropy.device)
    if packed:
        return _validate_packed(None, None, mask, advantages, group_size, old_logp, ref_logp, lam, config, num_tokens,
                                num_sequences, group_lengths, group_index, token_weights, cu_seqlens, shape[0],
                                logp.device, compute_dtype(logp.dtype), "logp", values)
    B, T = shape
    return _validate_rows(None, None, mask, advantages, group_size, old_logp, ref_logp, lam, config,
                          num_tokens, num_sequences, group_lengths, group_index, token_weights, B, T, logp.device,
                          compute_dtype(logp.dtype), "logp", values)


def _check_packed_mask(mask, N: int, dev, what: str) -> None:
    if tuple(mask.shape) != (N,):
        fail("mask", f"shape ({N},) (N of {what}) {PACKED_HINT}", f"shape {tuple(mask.shape)}")
    if mask.device != dev:
        fail("mask", f"device {dev} (that of {what})", mask.device)


def _validate_packed(primary, tokens, mask, advantages, group_size, old_logp, ref_logp, lam, config, num_tokens,
                     num_sequences, group_lengths, group_index, token_weights, cu_seqlens, N, dev, cdt, what,
                     values) -> Batch:
    """Packed inputs (N tokens, cu_seqlens): the shared normalisation step (lambda_grpo/_packed.py)
    turns them into the (B, T_max) row layout, then the rules of every entry point apply.
    `mask` is a checked (N,) bool tensor, `tokens` a checked (N,) integer tensor or None."""
    pos, B, T, mask_bt, tokens_bt, per, adv = unpack_inputs(
        cu_seqlens, N, dev, what, mask, tokens,
        {"old_logp": old_logp, "ref_logp": ref_logp, "token_weights": token_weights}, advantages)
    if adv is None:
        fail("advantages", f"a tensor of shape ({B},) or ({N},) {PACKED_HINT}", None)
    batch = _validate_rows(primary, tokens_bt, mask_bt, adv, group_size, per["old_logp"], per["ref_logp"], lam,
                           config, num_tokens, num_sequences, group_lengths, group_index, per["token_weights"], B, T,
                           dev, cdt, what, values)
    batch.packed_pos, batch.vocab_mask = pos, mask
    batch.vocab_tokens = None if tokens is None else tokens
    return batch


def _bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask as bool. A non-bool mask's values other than 0 and 1 are checked by
    `_mask_poison` (device) or, under check_values(), here (host)."""
    if mask.dtype != torch.bool:
        if mask.dtype.is_complex:
            fail("mask", "bool or 0/1 values", mask.dtype)
        if _host_checks():
            _raise(mask_error(mask))
        mask = mask != 0
    return mask.contiguous()  # the kernels index it flat (no op when it is contiguous already)


def _mask_poison(raw: torch.Tensor) -> Optional[torch.Tensor]:
    """0-d bool on the device: a non-bool mask holds a value other than 0 and 1 (None for bool)."""
    if raw.dtype == torch.bool or raw.numel() == 0:
        return None
    return ((raw != 0) & (raw != 1)).any()


def _validate_rows(logits, tokens, mask, advantages, group_size, old_logp, ref_logp, lam, config, num_tokens,
                   num_sequences, group_lengths, group_index, token_weights, B, T, dev, cdt, what, values) -> Batch:
    """The rules shared by every entry point, for a batch of shape (B, T) on `dev`; `values` is
    the _Values record of the entry point (the value rules so far)."""
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        fail("group_size", "a positive int", repr(group_size))
    gl, gi = _group_lengths(group_lengths, group_index, group_size, mask, B, T, dev, values)
    if gl is None and B % group_size != 0:
        fail("group_size", f"a divisor of B = {B} (or pass group_lengths and group_index)", group_size)
    if advantages is None:
        fail("advantages", f"a tensor of shape ({B},) or ({B}, {T})", None)
    adv = _per_token(advantages, "advantages", B, T, dev, cdt, allow_seq=True, what=what)
    old = _per_token(old_logp, "old_logp", B, T, dev, cdt, what=what)
    ref = _per_token(ref_logp, "ref_logp", B, T, dev, cdt, what=what)
    tw = _per_token(token_weights, "token_weights", B, T, dev, cdt, what=what)
    if config.beta > 0 and ref is None:
        fail("ref_logp", f"a ({B}, {T}) tensor because config.beta = {config.beta} > 0", None)
    if config.uses_lambda:
        if lam is None:
            fail("lam", "a 0-d tensor (aggregation='lambda_grpo' needs it)", None)
    if lam is not None:
        if not isinstance(lam, torch.Tensor):
            if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
                fail("lam", "a 0-d tensor", type(lam).__name__)
            lam = torch.tensor(float(lam), device=dev)
        if lam.numel() != 1 or lam.dim() > 1:
            fail("lam", "a 0-d tensor", f"shape {tuple(lam.shape)}")
        if not lam.dtype.is_floating_point:
            fail("lam", "a floating dtype", lam.dtype)
        if lam.device != dev and lam.device.type != "cpu":
            fail("lam", f"device {dev}", lam.device)
        lam = lam.reshape(())
    n_tok = _normaliser(num_tokens, "num_tokens", dev, cdt)
    n_seq = _normaliser(num_sequences, "num_sequences", dev, cdt)
    return Batch(logits, tokens, mask, adv, old, ref, lam, n_tok, n_seq, int(group_size), gl, gi, tw,
                 poison=values.poison, values=values)


def _group_lengths(group_lengths, group_index, group_size, mask, B, T, dev, values):
    """group_lengths (B, G) and group_index (B,): both or neither; G = group_size; integer
    lengths >= 0; index in [0, G); and group_lengths[i, group_index[i]] = n_i, the row's own
    number of valid tokens (value rules: on the device, see the module docstring). A sibling's
    length may exceed this call's T: its row lives in another call (another rank or micro-batch),
    padded to its own width."""
    if group_lengths is None and group_index is None:
        return None, None
    if group_lengths is None or group_index is None:
        missing = "group_index" if group_index is None else "group_lengths"
        fail(missing, "a tensor when " + ("group_lengths" if missing == "group_index" else "group_index")
             + " is given (they come together)", None)
    for name, x, shape in (("group_lengths", group_lengths, (B, group_size)), ("group_index", group_index, (B,))):
        if not isinstance(x, torch.Tensor):
            fail(name, "a torch.Tensor", type(x).__name__)
        if tuple(x.shape) != shape:
            fail(name, f"shape {shape} (B, and G = group_size)" if name == "group_lengths" else f"shape {shape}",
                 f"shape {tuple(x.shape)}")
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            fail(name, "an integer dtype", x.dtype)
        if x.device != dev:
            fail(name, f"device {dev}", x.device)
    gl, gi = group_lengths.long(), group_index.long()
    if _host_checks():
        _raise(group_error(gl, gi, group_size, mask))
    if B > 0:
        safe = gi.clamp(0, group_size - 1)
        own = gl.gather(1, safe[:, None]).squeeze(1)
        bad = ((gl < 0).any(dim=1) | (safe != gi) | (own != mask.sum(dim=1))).any()
        values.poison = _any(values.poison, bad)
        values.groups = (gl, gi, group_size, mask)
        gi = safe
    return gl, gi


def validate_linear(hidden, weight, bias, tokens, mask, advantages, group_size, old_logp, ref_logp, lam, config,
                    num_tokens, num_sequences, group_lengths=None, group_index=None, token_weights=None,
                    cu_seqlens=None, packed=False) -> Batch:
    """The same rules for the entry point from hidden states (B, T, H) and an LM head weight
    (V, H) (and bias (V,)); returns a Batch without logits. With cu_seqlens: hidden (N, H) and
    every per-token input (N,). packed=True without cu_seqlens: the (N, H) layout checks only
    (linear_token_logprobs)."""
    if not isinstance(config, LossConfig):
        fail("config", "a lambda_grpo.LossConfig", type(config).__name__)
    if not isinstance(hidden, torch.Tensor):
        fail("hidden", "a torch.Tensor", type(hidden).__name__)
    check_has_data(hidden, "hidden")
    check_has_data(weight, "weight")
    packed = packed or cu_seqlens is not None
    if hidden.dim() != (2 if packed else 3):
        fail("hidden", f"shape (N, H) with 2 dims {PACKED_HINT}" if packed else "shape (B, T, H) with 3 dims",
             f"shape {tuple(hidden.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        fail("hidden", "dtype float32, bfloat16, float16 or float64", hidden.dtype)
    lead, Hd = tuple(hidden.shape[:-1]), hidden.shape[-1]
    if not isinstance(weight, torch.Tensor):
        fail("weight", "a torch.Tensor", type(weight).__name__)
    if weight.dim() != 2 or weight.shape[1] != Hd or weight.shape[0] < 1:
        fail("weight", f"shape (V, {Hd}) with V >= 1 (H of hidden)", f"shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        fail("weight", f"dtype {hidden.dtype} (that of hidden)", weight.dtype)
    if weight.device != hidden.device:
        fail("weight", f"device {hidden.device} (that of hidden)", weight.device)
    V = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            fail("bias", "None or a torch.Tensor", type(bias).__name__)
        if tuple(bias.shape) != (V,) or bias.dtype != hidden.dtype or bias.device != hidden.device:
            fail("bias", f"shape ({V},) {hidden.dtype} on {hidden.device}",
                 f"shape {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if not isinstance(mask, torch.Tensor):
        fail("mask", "a torch.Tensor", type(mask).__name__)
    if tuple(mask.shape) != lead:
        fail("mask", f"shape {lead} ({'N' if packed else 'B, T'} of hidden)", f"shape {tuple(mask.shape)}")
    if mask.device != hidden.device:
        fail("mask", f"device {hidden.device} (that of hidden)", mask.device)
    raw_mask = mask
    mask = _bool_mask(mask)
    check_tokens(tokens, lead, V, hidden.device, mask, "hidden")
    if packed and cu_seqlens is None:
        return None
    ids, values = _value_rules(tokens, mask, V, raw_mask)
    if cu_seqlens is not None:
        return _validate_packed(None, ids, mask, advantages, group_size, old_logp, ref_logp, lam, config,
                                num_tokens, num_sequences, group_lengths, group_index, token_weights, cu_seqlens,
                                lead[0], hidden.device, compute_dtype(hidden.dtype), "hidden", values)
    B, T = lead
    return _validate_rows(None, ids, mask, advantages, group_size, old_logp, ref_logp, lam, config,
                          num_tokens, num_sequences, group_lengths, group_index, token_weights, B, T, hidden.device,
                          compute_dtype(hidden.dtype), "hidden", values)


def check_tokens(tokens, shape: tuple, V: int, device, mask, what: str) -> None:
    """tokens: an integer tensor of `shape` ((B, T), or (N,) packed) on `device` with ids in
    [0, V) where mask is set."""
    if not isinstance(tokens, torch.Tensor):
        fail("tokens", "a torch.Tensor", type(tokens).__name__)
    if tuple(tokens.shape) != tuple(shape):
        names = "B, T" if len(shape) == 2 else "N"
        fail("tokens", f"shape {tuple(shape)} ({names} of {what})", f"shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        fail("tokens", "an integer dtype (int64)", tokens.dtype)
    if tokens.device != device:
        fail("tokens", f"device {device} (that of {what})", tokens.device)
    if _host_checks():
        _raise(token_error(tokens, mask, V))
