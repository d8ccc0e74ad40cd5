"""Sections 3 and 4, compile and graph: the step captured whole.

compile: torch.compile(fullgraph=True) of a `GRPOLoss(backend="triton")` step (N = 4096,
  V = 151 936, bf16), fused and two-pass: the captured graph calls our loss op with engine
  "triton"; the Triton launchers run inside the compiled step (call counts) and the CUDA profiler
  sees our kernels; loss, dlogits and dlambda equal eager; new lambda / advantages / lengths do
  not recompile (`error_on_recompile`); peak memory of a step, eager vs compiled.
graph (issue 20 target 3): one fwd+bwd step of `grpo_loss(backend="triton")` captured in a CUDA
  graph (torch.cuda.graph) at small N (2048 x 32 000), fused and two-pass: host syncs in one eager
  step counted first (a TorchDispatchMode that flags ops which read a device value on the host,
  and on CUDA torch.cuda.set_sync_debug_mode); then capture, and replays with new advantages, a
  new lambda, a new mask and new logits, each equal to an eager step on the same values; the
  replay's time next to the eager step's (and Liger's, in the report).
"""

from __future__ import annotations

import time
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lambda_grpo as lg

from . import internals
from .common import (DTYPES, LAM, Budget, Peak, Plan, Results, cfg_of, cuda_clock, fail, free, make_inputs,
                     median_stats, random_mask, shape_of, skip_spent, sync)


# ------------------------------------------------------------------------------------------
# compile
# ------------------------------------------------------------------------------------------
def _peak_step(P: Plan, fn, x0: torch.Tensor) -> int:
    x = x0.detach().clone().requires_grad_(True)
    probe = Peak(P.device)
    probe.start()
    fn(x).backward()
    peak = probe.peak()
    del x
    return peak


def run_compile(P: Plan, R: Results, budget: Budget) -> None:
    S = "compile"
    from torch._dynamo.backends.registry import lookup_backend
    from torch._inductor.compile_fx import compile_fx

    aot_eager = lookup_backend("aot_eager")
    if P.dry:
        R.note(S, "dry run: the compiled graph runs through AOTAutograd with the aot_eager backend; inductor's "
                  "code generation (a C++ build on the CPU) is left to the GPU run")
    B, T, V, dtn = P.compile_shape
    dtype = DTYPES[dtn]
    dev = P.device
    inp = make_inputs(B, T, V, dtype, dev, seed=400)
    shp = shape_of(inp)
    dl_bytes = inp["logits"].numel() * inp["logits"].element_size()
    for key, c in (("fused", "lambda_fused"), ("two-pass", "lambda_both_ratio")):
        name = f"{key} ({c})"
        if budget.over():
            skip_spent(R, S, name, **shp)
            continue
        try:
            torch._dynamo.reset()
            graphs = []

            def backend(gm, example_inputs):
                graphs.append(gm)
                if P.dry:  # AOTAutograd without inductor's code generation (a C++ build on the CPU, ~25 s)
                    return aot_eager(gm, example_inputs)
                return compile_fx(gm, example_inputs)

            loss_fn = lg.GRPOLoss(cfg_of(c), backend="triton").to(dev)
            with torch.no_grad():
                loss_fn.lam.fill_(LAM)

            def step(x, mask, adv):
                return loss_fn(x, inp["tokens"], mask, adv, group_size=inp["group_size"], old_logp=inp["old_logp"],
                               ref_logp=inp["ref_logp"]).loss

            compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
            mask, adv = inp["mask"], inp["advantages"]

            xe = inp["logits"].detach().clone().requires_grad_(True)
            le = step(xe, mask, adv)
            le.backward()
            dlam_e, loss_fn.lam.grad = loss_fn.lam.grad, None
            t0 = time.perf_counter()
            with internals.counting_engine() as counts:
                xc = inp["logits"].detach().clone().requires_grad_(True)
                lc = compiled(xc, mask, adv)
                lc.backward()
                sync(dev)
            dlam_c, loss_fn.lam.grad = loss_fn.lam.grad, None
            R.add(S, f"{name}: first compiled step", "OK", value=f"{time.perf_counter() - t0:.1f}", unit="s",
                  detail="dynamo + " + ("aot_eager" if P.dry else "inductor") + " compile included", dtype=dtn,
                  **shp)
            # (a) the graph calls our op with the Triton engine
            n_ops, engines = internals.loss_op_nodes(graphs)
            ok = len(graphs) == 1 and n_ops == 1 and engines == ["triton"]
            R.add(S, f"{name}: graph calls {internals.LOSS_OP}(engine='triton')", "PASS" if ok else "FAIL",
                  dtype=dtn, detail=f"{len(graphs)} graph(s), {internals.LOSS_OP} nodes {n_ops}, engine args "
                                    f"{engines} (bench/gpu_check/internals.py)", **shp)
            # (b) the Triton launchers ran inside the compiled step
            want = internals.FUSED_LAUNCHERS if key == "fused" else internals.TWO_PASS_LAUNCHERS
            ok = all(counts[w] > 0 for w in want)
            R.add(S, f"{name}: Triton engine ran", "PASS" if ok else "FAIL", dtype=dtn,
                  detail="calls: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), **shp)
            # (c) and launched the kernels (the CUDA profiler's view)
            if dev == "cuda":
                try:
                    from torch.profiler import ProfilerActivity, profile

                    x = inp["logits"].detach().clone().requires_grad_(True)
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        compiled(x, mask, adv).backward()
                        sync(dev)
                    loss_fn.lam.grad = None
                    names = {e.key for e in prof.key_averages()}
                    ours = sorted({k for n in names for k in internals.OUR_KERNELS if k in n})
                    if not names:
                        R.add(S, f"{name}: CUDA kernels launched", "INFO", dtype=dtn,
                              detail="the profiler recorded no CUDA kernels (CUPTI unavailable?)", **shp)
                    else:
                        R.add(S, f"{name}: CUDA kernels launched", "PASS" if ours else "FAIL", dtype=dtn,
                              detail=f"ours: {ours}; {len(names)} kernel names in all", **shp)
                    del x
                except Exception as e:  # noqa: BLE001
                    R.add(S, f"{name}: CUDA kernels launched", "INFO", dtype=dtn,
                          detail=f"profiler unavailable: {type(e).__name__}: {e}", **shp)
            else:
                R.add(S, f"{name}: CUDA kernels launched", "SKIP", detail="dry run: no CUDA profiler", **shp)
            # (d) same loss and gradients as eager (the same kernels run in both)
            from tests._compare import max_err

            tol = 2.0**-8 if dtype == torch.bfloat16 else 1e-5
            for q, a, b in (("loss", lc, le), ("dlogits", xc.grad, xe.grad), ("dlam", dlam_c, dlam_e)):
                if a is None or b is None:
                    R.add(S, f"{name}: compiled vs eager {q}", "FAIL", dtype=dtn,
                          detail=f"no {q}: compiled {a is not None}, eager {b is not None}", **shp)
                    continue
                err = max_err(a.detach(), b.detach())
                allowed = 1e-5 * max(float(b.detach().double().abs().max()), 1e-30) if q != "dlogits" else \
                    tol * float(b.double().abs().max())
                R.add(S, f"{name}: compiled vs eager {q}", "PASS" if err <= allowed else "FAIL", dtype=dtn, err=err,
                      allowed=allowed, **shp)
            del xe, xc, le, lc
            # (e) new lambda, advantages, lengths: no recompilation, and the values reach the graph
            g = torch.Generator(device=dev)
            g.manual_seed(401)
            lengths = torch.randint(T // 4, T + 1, (B,), generator=g, device=dev)
            new_mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]
            variants = [("lambda", mask, adv), ("advantages", mask, torch.randn(B, generator=g, device=dev)),
                        ("lengths", new_mask, adv)]
            losses = [float(compiled(inp["logits"].detach().clone().requires_grad_(True), mask, adv))]
            frames = len(graphs)
            try:
                with torch._dynamo.config.patch(error_on_recompile=True):
                    for what, m, a in variants:
                        if what == "lambda":
                            with torch.no_grad():
                                loss_fn.lam.fill_(-1.1)
                        x = inp["logits"].detach().clone().requires_grad_(True)
                        out = compiled(x, m, a)
                        out.backward()
                        losses.append(float(out))
                        del x
                ok = len(graphs) == frames and len(set(losses)) == len(losses)
                R.add(S, f"{name}: new lambda / advantages / lengths, no recompile", "PASS" if ok else "FAIL",
                      dtype=dtn, detail=f"graphs {len(graphs)}, losses {[f'{v:.6g}' for v in losses]}", **shp)
            except Exception as e:  # noqa: BLE001
                fail(R, S, f"{name}: new lambda / advantages / lengths, no recompile", e, dtype=dtn, **shp)
            with torch.no_grad():
                loss_fn.lam.fill_(LAM)
            loss_fn.lam.grad = None
            # (f) peak memory of a step, eager vs compiled
            for how, fn in (("eager", lambda x: step(x, mask, adv)), ("compiled", lambda x: compiled(x, mask, adv))):
                peak = _peak_step(P, fn, inp["logits"])
                loss_fn.lam.grad = None
                R.add(S, f"{name}: peak memory {how}", "OK", dtype=dtn, peak_mem_bytes=peak,
                      peak_x_dlogits=peak / dl_bytes, detail=P.memory, **shp)
        except Exception as e:  # noqa: BLE001
            fail(R, S, name, e, dtype=dtn, **shp)
        free(dev)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------
# host syncs
# ------------------------------------------------------------------------------------------
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique", "_unique",
             "_unique2", "unique_consecutive", "unique_dim", "bincount", "histc"}


class HostReads(TorchDispatchMode):
    """Flags the aten ops that read a device value on the host (a sync on CUDA): .item() / bool() /
    int() of a tensor, nonzero, boolean-mask indexing, masked_select, device-to-host copies. On a
    CPU it counts what would sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.seen: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        flat = tree_flatten((args, kwargs or {}))[0]
        if name in _SYNC_OPS:
            self.seen.append(name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in flat[1:]):
            self.seen.append(f"{name}[bool mask]")
        elif name in ("_to_copy", "copy_") and kwargs and str(kwargs.get("device", "")) == "cpu" and any(
                isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in flat):
            self.seen.append(f"{name} to cpu")
        elif name == "repeat_interleave" and "output_size" not in (kwargs or {}):
            if any(isinstance(t, torch.Tensor) for t in flat[1:2]):
                self.seen.append("repeat_interleave[tensor repeats]")
        return func(*args, **(kwargs or {}))


def count_host_syncs(step, device: str) -> Tuple[int, List[str], Optional[int], List[str]]:
    """(ops that read device values on the host, their names; on CUDA the syncs torch reports
    (set_sync_debug_mode "warn"), where they come from) for one call of step()."""
    mode = HostReads()
    with mode:
        step()
    cuda_n, where = None, []
    if device == "cuda":
        sync(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        hits = [w for w in caught if "synchroniz" in str(w.message)]
        cuda_n = len(hits)
        where = [f"{w.filename.split('lambda_grpo')[-1]}:{w.lineno}" for w in hits]
    return len(mode.seen), mode.seen, cuda_n, where


# ------------------------------------------------------------------------------------------
# graph
# ------------------------------------------------------------------------------------------
class Replayer:
    """One step captured in a CUDA graph (on CUDA), or the same step called eagerly (dry run): the
    static tensors are the step's inputs, `replay()` returns its static outputs."""

    def __init__(self, step, device: str, warmup: int = 3):
        self.step, self.cuda = step, device == "cuda"
        if self.cuda:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(warmup):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            sync(device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outs = step()
            sync(device)

    def replay(self):
        if self.cuda:
            self.graph.replay()
            return self.outs
        return self.step()


def run_graph(P: Plan, R: Results, budget: Budget) -> None:
    S = "graph"
    from tests._compare import max_err

    B, T, V, dtn = P.graph_shape
    dev = P.device
    if not P.dry:
        R.note(S, "torch.cuda.graph of one grpo_loss(backend='triton') fwd+bwd; replays after copying new values "
                  "into the captured input tensors, each compared with an eager step on the same values")
    else:
        R.note(S, "dry run: no CUDA graph; the same step runs as an eager closure over the same static tensors "
                  "(the plumbing of the replay checks, not capture)")
    for c in P.graph_cfgs:
        shp = dict(B=B, T=T, V=V, N=B * T, dtype=dtn)
        name = f"{c}"
        if budget.over():
            skip_spent(R, S, name, **shp)
            continue
        try:
            _graph_one(P, R, c, (B, T, V, dtn), shp, max_err)
        except Exception as e:  # noqa: BLE001
            fail(R, S, f"{name}: capture / replay", e, **shp)
        free(dev)


def _graph_one(P: Plan, R: Results, c: str, shape, shp: dict, max_err) -> None:
    S = "graph"
    B, T, V, dtn = shape
    dev = P.device
    cfg = cfg_of(c)
    inp = make_inputs(B, T, V, DTYPES[dtn], dev, seed=450)
    x = inp["logits"].detach().clone().requires_grad_(True)
    lam = torch.tensor(LAM, device=dev, requires_grad=True) if cfg.uses_lambda else None
    tokens, mask, adv, old, ref = (inp[k] for k in ("tokens", "mask", "advantages", "old_logp", "ref_logp"))
    G = inp["group_size"]

    def loss_of(xx, ll):
        return lg.grpo_loss(xx, tokens, mask, adv, G, old_logp=old, ref_logp=ref, lam=ll, config=cfg,
                            backend="triton").loss

    def step():
        x.grad = None
        if lam is not None:
            lam.grad = None
        loss = loss_of(x, lam)
        loss.backward()
        return loss.detach(), x.grad, None if lam is None else lam.grad

    def eager():
        xx = x.detach().clone().requires_grad_(True)
        ll = None if lam is None else lam.detach().clone().requires_grad_(True)
        loss = loss_of(xx, ll)
        loss.backward()
        return loss.detach(), xx.grad, None if ll is None else ll.grad

    n_ops, ops, n_cuda, where = count_host_syncs(step, dev)
    cuda_txt = "" if n_cuda is None else f"; CUDA sync debug mode: {n_cuda} sync(s) at {sorted(set(where))[:6]}"
    syncs = n_cuda if n_cuda is not None else n_ops
    # a FAIL on a GPU (a capture forbids host syncs); in the dry run a count of what would sync there
    status = "PASS" if syncs == 0 else "INFO" if P.dry else "FAIL"
    R.add(S, f"{c}: host syncs in one eager step", status, value=str(syncs), unit="syncs",
          detail=f"ops reading device values on the host: {n_ops} {sorted(set(ops))}{cuda_txt}" +
          (" (dry run: each would be a host sync on CUDA)" if P.dry and syncs else ""), **shp)
    if dev == "cuda" and syncs:
        R.add(S, f"{c}: captured in a CUDA graph", "FAIL", **shp,
              detail=f"not attempted: the step reads device values on the host ({syncs} syncs), which a capture "
                     "forbids (it would abort the capture)")
        return
    t0 = time.perf_counter()
    rep = Replayer(step, dev)
    R.add(S, f"{c}: captured in a CUDA graph", "PASS" if dev == "cuda" else "SKIP", **shp,
          value=f"{time.perf_counter() - t0:.2f}", unit="s",
          detail="torch.cuda.graph, 3 warm-up steps on a side stream" if dev == "cuda" else
          "dry run: no CUDA; eager replays below")
    g = torch.Generator(device=dev)
    g.manual_seed(451)
    new_mask = random_mask(B, T, g, dev)
    changes = [("as captured", None),
               ("new advantages", lambda: adv.copy_(torch.randn(adv.shape, generator=g, device=dev))),
               ("new lambda", (lambda: lam.fill_(-1.1)) if lam is not None else None),
               ("new mask", lambda: mask.copy_(new_mask)),
               ("new logits", lambda: x.copy_(x * 0.5 + 0.25))]
    prev = None
    for what, change in changes:
        if what != "as captured" and change is None:
            continue
        if change is not None:
            with torch.no_grad():
                change()
        outs = [None if o is None else o.clone() for o in rep.replay()]
        sync(dev)
        ref_outs = eager()
        errs, bad = [], []
        for q, a, b in zip(("loss", "dlogits", "dlam"), outs, ref_outs):
            if (a is None) != (b is None):
                bad.append(f"{q}: replay {a is not None}, eager {b is not None}")
                continue
            if a is None:
                continue
            err = max_err(a, b)
            allowed = 1e-6 * max(float(b.double().abs().max()), 1e-30)
            errs.append(f"{q} {err:.2g}")
            if not err <= allowed:
                bad.append(f"{q}: err {err:.3g} > {allowed:.3g}")
        moved = prev is None or float(outs[0]) != prev
        if not moved:
            bad.append(f"the loss did not change ({float(outs[0]):.9g}): the new values did not reach the step")
        prev = float(outs[0])
        R.add(S, f"{c}: replay, {what}", "PASS" if not bad else "FAIL", value=f"{prev:.9g}", unit="loss",
              detail=f"vs an eager step on the same values: {', '.join(errs)}" + (f"; {bad}" if bad else ""), **shp)
    # time: replay vs eager step (CUDA events around each; eager includes its host time)
    clock = cuda_clock(dev)
    reps = int(P.reps["graph_reps"])
    med: Dict[str, float] = {}
    for how, fn in (("graph replay", rep.replay), ("eager step", step)):
        fn()
        ts = []
        for _ in range(reps):
            a = clock.mark()
            fn()
            ts.append(clock.between(a, clock.mark()))
        st = median_stats(ts)
        med[how] = st["median_ms"]
        R.add(S, f"{c}: {how} time", "OK", provider=f"ours_{how.split()[0]}", **st, **shp, detail=P.timer)
    R.add(S, f"{c}: replay / eager", "INFO", value=f"{med['graph replay'] / med['eager step']:.3f}", unit="ratio",
          **shp)
    del rep
