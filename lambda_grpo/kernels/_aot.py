"""Ahead-of-time compilation of every kernel specialisation to cubin, and `ptxas -v` stats.

Runs on a machine without a GPU: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`
needs no driver. Must run WITHOUT TRITON_INTERPRET (under the interpreter `@triton.jit` gives
interpreted functions): `python -m lambda_grpo.kernels._aot [--json] [--arch 80 90]`.

The specialisations are `_config.specialisations()` crossed with what Triton's JIT itself
specialises on for the vocab kernels: V and the batch and row strides of the logits (equal for
contiguous logits), which are divisible by 16 ("D": every real vocabulary; this is what lets
the tile loads compile to 128-bit vector loads), not ("plain": odd V) or 1 (V = 1, made a
constant). Pointers are taken as 16-byte aligned (fresh torch allocations); every other int
argument is marked do_not_specialize in the kernels, so it adds no variant.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from . import _config
from .groups import group_weights_kernel
from .rows import finish_kernel, finish_tokens_kernel, row_kernel
from .vocab_bwd import scale_kernel, vocab_bwd_kernel
from .vocab_fused import vocab_fused_kernel
from .vocab_fwd import vocab_fwd_kernel

KERNELS = {
    "vocab_fwd": vocab_fwd_kernel,
    "vocab_fused": vocab_fused_kernel,
    "vocab_bwd": vocab_bwd_kernel,
    "scale": scale_kernel,
    "rows": row_kernel,
    "finish": finish_kernel,
    "finish_tokens": finish_tokens_kernel,
    "groups": group_weights_kernel,
}
_TORCH_TO_TT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_PTR_TYPES = {"tokens_ptr": "i64", "mask_ptr": "i1", "poison_ptr": "i1", "flag_ptr": "i1", "len_ptr": "i32",
              "pos_ptr": "i32", "scr_ptr": "fp64", "gl_ptr": "i64", "gi_ptr": "i64", "lam_ptr": "fp64"}
# int scalars (the rest are fp32): sizes, strides of per-token inputs, codes and flags
_INT_ARGS = ("V", "T", "G", "B", "N", "adv_sb", "adv_st", "w_sb", "w_st", "w_s", "d_sb", "d_st",
             "kl_est", "surr", "kl_rw", "write_coef", "write_tok", "check_ids")
_LOGITS_PTRS = ("logits_ptr", "dlogits_ptr", "d_ptr")
STRIDE_CLASSES = ("D", "plain", "one")


def _signature(fn, logits_dtype, constexprs: dict, stride_class: str):
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
            consts[name] = constexprs[name]
        elif name.endswith("_ptr"):
            ty = _TORCH_TO_TT[logits_dtype] if name in _LOGITS_PTRS else _PTR_TYPES.get(name, "fp32")
            sig[name] = "*" + ty
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("stride") or name == "V":
            if stride_class == "one":
                sig[name] = "constexpr"
                consts[name] = 1
            else:
                sig[name] = "i32"
                if stride_class == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.annotation:
            sig[name] = p.annotation
        elif name in _INT_ARGS or name.startswith("has_"):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig, consts, attrs


def variants():
    """Every (kernel, logits dtype or None, Launch, stride class) the launchers can produce."""
    for name, dt, launch in _config.specialisations():
        has_stride = any(p.name.startswith("stride") for p in KERNELS[name].params)
        for sc in (STRIDE_CLASSES if has_stride else ("-",)):
            yield name, dt, launch, sc


def ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for this arch (the wheel ships two: CUDA 12.x for < sm_90,
    a newer one for sm_90+, whose PTX ISA version the older one rejects)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def ptxas_stats(ptx: str, arch: int) -> dict:
    """Registers, spill bytes, stack and static smem from `ptxas -v` for sm_<arch>."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        # the PTX names its own target (Triton emits sm_90a for cc 90): compile for exactly that
        m = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)
        gpu = m.group(1) if m else f"sm_{arch}"
        res = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"ptxas failed for {gpu}: {res.stderr.strip()}")
    text = res.stdout + res.stderr

    def grab(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return dict(registers=grab(r"Used (\d+) registers"), spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"), stack=grab(r"(\d+) bytes stack frame"),
                static_smem=grab(r"(\d+) bytes smem"), ptxas=text.strip())


def compile_variant(name, dt, launch, stride_class, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = KERNELS[name]
    consts = dict(launch.constexprs)
    sig, cx, attrs = _signature(fn, dt or torch.float32, consts, stride_class)
    t0 = time.perf_counter()
    src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                        options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
    secs = time.perf_counter() - t0
    stats = ptxas_stats(ck.asm["ptx"], arch)
    spec = ",".join(f"{k}={v}" for k, v in launch.constexprs)
    return dict(kernel=name, dtype=None if dt is None else str(dt).replace("torch.", ""), spec=spec,
                stride=stride_class, arch=f"sm_{arch}", num_warps=launch.num_warps, shared=ck.metadata.shared,
                cubin_bytes=len(ck.asm["cubin"]), compile_s=round(secs, 2), **stats)


def compile_all(archs=(80, 90), kernels=None, stride_classes=STRIDE_CLASSES):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: AOT compilation needs the real @triton.jit (unset it)")
    rows = []
    for name, dt, launch, sc in variants():
        if (kernels and name not in kernels) or (sc != "-" and sc not in stride_classes):
            continue
        for arch in archs:
            rows.append(compile_variant(name, dt, launch, sc, arch))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--kernels", nargs="*", default=None)
    ap.add_argument("--strides", nargs="*", default=list(STRIDE_CLASSES))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = compile_all(tuple(args.arch), args.kernels, tuple(args.strides))
    for r in rows:
        r.pop("ptxas")
    if args.json:
        json.dump(rows, sys.stdout)
    else:
        for r in rows:
            print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
