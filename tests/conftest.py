"""Test session setup.

TRITON_INTERPRET=1 must be set before any kernel module is imported; conftest.py
is imported by pytest before the test modules, so setting it here (only when CUDA is absent)
makes backend="triton" run on this CPU machine through the interpreter.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _inductor_cache_per_source() -> None:
    """Inductor caches compiled graphs on disk keyed by the graph, not by the Python source of our
    custom ops' fake kernels: after a change of an op's output shapes a stale entry fails with
    "expected size 5==4 ... incorrect fake kernel". A cache folder per version of lambda_grpo/_ops.py and _compute.py
    keeps the cache useful between runs and never stale."""
    import hashlib
    import tempfile

    pkg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lambda_grpo")
    h = hashlib.sha256()
    try:
        for name in ("_ops.py", "_compute.py"):  # the ops and their fake kernels
            with open(os.path.join(pkg, name), "rb") as f:
                h.update(f.read())
    except OSError:
        return
    digest = h.hexdigest()[:12]
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"lg-inductor-{digest}"))


_inductor_cache_per_source()

def _speed_up_interpreter() -> None:
    """Skip the interpreter's per-call re-patching of triton.language for our jit helpers.

    Triton 3.9's interpreter re-patches every builtin of the callee's `tl` module on each
    device-function call (~3 ms per call, about half the interpreted run time here). Our
    helpers (lambda_grpo.kernels.*) reference only `tl`, which the outer kernel, also ours,
    has already patched for the whole launch, so their re-patch is a no-op. Other callees
    (triton's own standard library) keep the original path. Set LG_INTERPRETER_PATCH=0 to
    turn this off.
    """
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("LG_INTERPRETER_PATCH", "1") == "0":
        return
    try:
        from triton.runtime import interpreter as itp
    except ImportError:
        return
    cls = getattr(itp, "InterpretedFunction", None)
    if cls is None or not hasattr(cls, "rewrite") or getattr(cls, "_lg_patched", False):
        return
    original = cls.__call__

    def call(self, *args, **kwargs):
        if getattr(self.fn, "__module__", "").startswith("lambda_grpo.kernels"):
            fn = self.rewrite()
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise itp.InterpreterError(repr(e)) from e
        return original(self, *args, **kwargs)

    cls.__call__ = call
    cls._lg_patched = True


def _round_bf16_to_nearest_even() -> None:
    """Make the interpreter's fp32 -> bf16 cast round to nearest even, as the GPU does.

    Triton 3.9's interpreter truncates in `x.to(tl.bfloat16)` (its cast passes no rounding
    mode), while compiled Triton emits cvt.rn.bf16.f32. Without this, every bf16 gradient
    store is up to one bf16 ulp off under the interpreter only, which the tolerance rule
    (2x plain torch, which rounds to nearest) rightly flags.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as itp
    except ImportError:
        return
    builder = getattr(itp, "InterpreterBuilder", None)
    if builder is None or getattr(builder, "_lg_bf16_rtne", False):
        return
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return itp.TensorHandle(data.view(torch.uint16).numpy(), tl.bfloat16)
        return original(self, src, dst_type)

    builder.cast_impl = cast_impl
    builder.create_fp_trunc = lambda self, src, dst_type: self.cast_impl(src, dst_type)
    builder._lg_bf16_rtne = True


_speed_up_interpreter()
_round_bf16_to_nearest_even()


@pytest.fixture
def two_threads():
    """A pinned thread count of 2 for the test, restored after it (the torch engine splits its
    chunks over its threads: results must not depend on the machine's default)."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)
