"""Peak memory of the loss from hidden states against N (issue 18 point 12).

    python -m bench.hidden_memory                                   # N = 2 048, 8 192, 32 768
    python -m bench.hidden_memory --N 2048 8192 --V 32000 --H 256 --json out.json

One forward + backward of `lg.fused_linear_grpo_loss(backend="torch")` per N, fp32, every token
valid, each N in its own fresh process (`--child`), measured as bench/worker.py measures a loss
call: glibc's free heap is returned (malloc_trim), the baseline VmRSS is read, the kernel's
high-water mark is reset (`echo 5 > /proc/self/clear_refs`), and after the backward VmHWM minus
the baseline is the call's peak extra resident memory (inputs excluded; dhidden, dW and the
chunk buffer included). Before it, a warm-up call on tiny shapes (N = 16, V = 1 000, the same H)
pays what the process's first call pays once whatever the shapes (imports, thread pools, code
pages: about 170 MiB here); that figure is reported too, as `first_call_mib`.

The memory model next to each row: dW (V, H) fp32 + dhidden (N, H) + one chunk of logits
(`lambda_grpo._linear.chunk_rows` rows of V, hidden dtype). dW and the chunk do not depend on N
(once N reaches one chunk), so peak - dhidden must be flat in N: the report prints it and its
spread over the N measured. Memory, not time: the figures do not depend on the machine's load
(the call times printed next to them do).

`--mmap-threshold BYTES` runs the children with MALLOC_MMAP_THRESHOLD_ set (as bench/train_memory.py
does): glibc then maps every block above it separately and unmaps it when freed, so the resident
set follows the live tensors instead of what the heap keeps (with glibc's default, dynamic
threshold the per-chunk temporaries leave a few MiB of heap slack that varies from run to run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .child import run_child_json

MIB = 2**20
MODES = {"fused": dict(aggregation="grpo", beta=0.04),  # no ratio-mode trace: the fused schedule
         "two_pass": dict(aggregation="lambda_grpo", trace="recent", trace_mode="ratio")}


def model(N: int, V: int, H: int) -> dict:
    """The memory model in bytes: dW fp32, dhidden fp32, one chunk of fp32 logits."""
    import torch

    from lambda_grpo._linear import chunk_rows

    rows = min(chunk_rows(V, H, torch.device("cpu")), N)
    parts = {"dW": V * H * 4, "dhidden": N * H * 4, "chunk": rows * V * 4}
    return {"chunk_rows": rows, **parts, "total": sum(parts.values())}


def _inputs(N: int, V: int, H: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    B = 16 if N % 16 == 0 else 1
    T = N // B
    hidden = torch.randn(B, T, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H**0.5)).requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    adv = torch.randn(B, generator=g)
    # old/ref near a typical log-prob: their values move no buffer, only the numbers
    old = -11.0 + 0.3 * torch.randn(B, T, generator=g)
    ref = -11.0 + 0.3 * torch.randn(B, T, generator=g)
    return hidden, weight, dict(tokens=tokens, mask=mask, advantages=adv, group_size=4 if B % 4 == 0 else 1,
                                old_logp=old, ref_logp=ref)


def _call(hidden, weight, kw, cfg, lam):
    import lambda_grpo as lg

    out = lg.fused_linear_grpo_loss(hidden, weight, kw["tokens"], kw["mask"], kw["advantages"], kw["group_size"],
                                    old_logp=kw["old_logp"], ref_logp=kw["ref_logp"], lam=lam, config=cfg,
                                    backend="torch")
    out.loss.backward()
    return float(out.loss)


def _child(N: int, V: int, H: int, mode: str, threads: int) -> dict:
    import torch

    import lambda_grpo as lg

    from .worker import MemProbe

    torch.set_num_threads(threads)
    cfg = lg.LossConfig(**MODES[mode])
    probe = MemProbe("cpu")
    if not probe.ok:
        raise SystemExit("cannot reset the high-water mark (/proc/self/clear_refs): Linux only")

    def lam():
        return torch.tensor(0.3, requires_grad=True) if cfg.uses_lambda else None

    h, w, kw = _inputs(16, 1000, H, seed=1)  # warm-up: the process's one-time costs
    probe.start()
    _call(h, w, kw, cfg, lam())
    first = probe.peak()
    del h, w, kw
    h, w, kw = _inputs(N, V, H)
    probe.start()
    t0 = time.perf_counter()
    loss = _call(h, w, kw, cfg, lam())
    secs = time.perf_counter() - t0
    peak = probe.peak()
    m = model(N, V, H)
    return dict(N=N, V=V, H=H, mode=mode, threads=threads, peak_mib=peak / MIB, first_call_mib=first / MIB,
                call_s=secs, loss=loss, model_mib=m["total"] / MIB, dW_mib=m["dW"] / MIB,
                dhidden_mib=m["dhidden"] / MIB, chunk_mib=m["chunk"] / MIB, chunk_rows=m["chunk_rows"],
                peak_minus_dhidden_mib=(peak - m["dhidden"]) / MIB, logits_mib=N * V * 4 / MIB,
                torch=torch.__version__)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hidden_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, nargs="+", default=[2048, 8192, 32768], help="valid tokens per call")
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--H", type=int, default=576)
    p.add_argument("--mode", choices=sorted(MODES), default="fused")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--mmap-threshold", type=int, default=0,
                   help="bytes: MALLOC_MMAP_THRESHOLD_ for the children (0: glibc's default, dynamic threshold)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args.child, args.V, args.H, args.mode, args.threads)))
        return 0
    rows = []
    for N in args.N:
        cmd = [sys.executable, "-m", "bench.hidden_memory", "--child", str(N), "--V", str(args.V), "--H", str(args.H),
               "--mode", args.mode, "--threads", str(args.threads)]
        r, err = run_child_json(cmd, args.mmap_threshold)
        if r is None:
            sys.stderr.write(err)
            return 1
        rows.append(r)
        print(f"N={N:>6}: peak {r['peak_mib']:7.1f} MiB = model {r['model_mib']:7.1f} (dW {r['dW_mib']:.1f} + "
              f"dhidden {r['dhidden_mib']:.1f} + chunk {r['chunk_rows']} rows {r['chunk_mib']:.1f}) "
              f"{r['peak_mib'] - r['model_mib']:+.1f}; peak - dhidden {r['peak_minus_dhidden_mib']:7.1f}; "
              f"(N, V) fp32 logits {r['logits_mib']:.0f}; first call of the process {r['first_call_mib']:.0f}; "
              f"{r['call_s']:.1f} s", flush=True)
    flat = [r["peak_minus_dhidden_mib"] for r in rows]
    print(f"peak - dhidden over N = {[r['N'] for r in rows]}: {min(flat):.1f} .. {max(flat):.1f} MiB "
          f"(spread {max(flat) - min(flat):.1f} MiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
