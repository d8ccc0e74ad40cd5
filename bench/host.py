"""Host work per training step, side by side with Liger-Kernel: ``python -m bench.host``.

On a GPU the loss's device work at small N is a fraction of a millisecond, so the host path
(validation, constants, op dispatch, launches) decides the step time (docs/gpu.md). This measures
that host path alone, on the CPU, with every Triton launch replaced by a no-op (ours and
Liger's), under TRITON_INTERPRET=1 so that the same launcher code runs without a GPU:

- host time of one forward + backward, fresh inputs every step (a new leaf of the logits),
  interleaved with Liger 0.8.5's ``triton_grpo_loss`` on the same inputs, the minimum of ``--rounds``
  rounds (the minimum: the host path is deterministic work, the noise of a shared machine only adds);
- dispatched aten ops per step (a TorchDispatchMode count, views included);
- host-device synchronisations per step (`SyncCounter`: ``.item()``/``bool()``/``int()`` of a
  tensor, ``nonzero``, boolean-mask indexing, ``masked_select``, data-dependent ``repeat_interleave``,
  ``unique``, ``equal``; what would stall the launch queue on CUDA).

Targets (issue 17): DAPO <= 1.5x Liger's host time, lambda-GRPO + "both" trace <= 2.5x, 0 syncs.
The figures are machine-dependent (a ratio to Liger in the same process is what is compared);
nothing here is asserted by a test except the sync count (tests/test_host_path.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable, Dict, List

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import torch  # noqa: E402
from torch._library import custom_ops as _custom_ops  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

aten = torch.ops.aten

# ops whose result the host must wait for (a value read, or an output shape that depends on values)
_SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
             aten.is_nonzero.default, aten.equal.default, aten._unique2.default, aten.unique_consecutive.default,
             aten.unique_dim.default, aten.nonzero_static.default}


class SyncCounter(TorchDispatchMode):
    """Counts dispatched aten ops and those that force a host-device synchronisation.

    `syncs` lists (op name, short reason). A boolean index (``x[mask]``) dispatches
    ``aten.index.Tensor`` with a bool tensor index: counted as a sync (its nonzero). A device to
    host copy (``.cpu()`` of a CUDA tensor, ``.tolist()``) is counted where the source is not on the
    CPU; on this CPU machine such copies cannot be seen, and the op list above is what catches the
    value reads."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if func.namespace != "aten":  # a custom op: run its Python body under this mode, to count inside it
            opdef = _custom_ops.OPDEFS.get(f"{func.namespace}::{func._opname}")
            if opdef is not None:
                with self:
                    return opdef._init_fn(*args, **kwargs)
        self.ops += 1
        if func in _SYNC_OPS:
            self.syncs.append(str(packet.__name__))
        elif packet is aten.index and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                          for i in (args[1] if len(args) > 1 else [])):
            self.syncs.append("index with a bool mask")
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None and func.overloadpacket and \
                len(args) >= 1 and isinstance(args[0], torch.Tensor) and args[0].dim() == 1 and \
                func == aten.repeat_interleave.Tensor:
            self.syncs.append("repeat_interleave without output_size")
        elif packet in (aten._to_copy, aten.copy_) and args and isinstance(args[0], torch.Tensor):
            dst = kwargs.get("device")
            src = args[1] if packet is aten.copy_ and len(args) > 1 else args[0]
            to_cpu = (dst is not None and torch.device(dst).type == "cpu") or (
                packet is aten.copy_ and args[0].device.type == "cpu")
            if to_cpu and isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta"):
                self.syncs.append("device to host copy")
        return func(*args, **kwargs)


@contextmanager
def stubbed_launches():
    """Every Triton kernel launch (interpreted) becomes a no-op: only the host path runs."""
    from triton.runtime import interpreter

    cls = interpreter.InterpretedFunction
    original = cls.run
    cls.run = lambda self, *a, **k: None
    try:
        yield
    finally:
        cls.run = original


def make_inputs(B: int, T: int, V: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(logits=torch.randn(B, T + 1, V, generator=g), tokens=torch.randint(0, V, (B, T), generator=g),
                mask=torch.rand(B, T, generator=g) > 0.1, adv=torch.randn(B, generator=g),
                old=torch.randn(B, T, generator=g) - 5, ref=torch.randn(B, T, generator=g) - 5)


def ours(cfg_kw: dict, G: int) -> Callable:
    import lambda_grpo as lg

    cfg = lg.LossConfig(**cfg_kw)
    lam = torch.zeros((), requires_grad=True) if cfg.uses_lambda else None

    def step(inp):
        x = inp["logits"][:, :-1].detach().requires_grad_(True)
        out = lg.grpo_loss(x, inp["tokens"], inp["mask"], inp["adv"], G, inp["old"], inp["ref"] if cfg.beta else None,
                           lam, config=cfg, backend="triton")
        out.loss.backward()
    return step


def liger(loss_type: str, beta: float) -> Callable:
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    def step(inp):
        x = inp["logits"].detach().requires_grad_(True)
        loss = triton_grpo_loss(x, inp["old"], inp["ref"] if beta else None, inp["tokens"], inp["adv"],
                                inp["mask"], temperature=1.0, beta=beta, eps_low=0.2, eps_high=0.2, inplace=True,
                                loss_type=loss_type, reduce=True)
        loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()
    return step


CASES = {
    # name: (our LossConfig fields, Liger's loss_type, beta)
    "dapo": (dict(aggregation="dapo"), "dapo", 0.0),
    "dapo+kl": (dict(aggregation="dapo", beta=0.04), "dapo", 0.04),
    "lambda_grpo+both": (dict(aggregation="lambda_grpo", trace="both"), "dapo", 0.0),
}


def count(step, inp):
    with SyncCounter() as c:
        step(inp)
    return c.ops, c.syncs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--V", type=int, default=64)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        import liger_kernel  # noqa: F401
        has_liger = True
    except ImportError:
        has_liger = False
    inputs = [make_inputs(args.B, args.T, args.V, seed=s) for s in range(4)]
    print(f"host path per fwd+bwd step, Triton launches stubbed, B={args.B} T={args.T} V={args.V} G={args.G}, "
          f"min of {args.rounds} interleaved rounds (torch {torch.__version__})")
    print(f"{'case':<18} {'ours us':>9} {'liger us':>9} {'ratio':>6} {'ours ops':>9} {'liger ops':>10} "
          f"{'ours syncs':>11} {'liger syncs':>12}")
    with stubbed_launches():
        for name in args.cases.split(","):
            cfg_kw, lt, beta = CASES[name]
            fns = {"ours": ours(cfg_kw, args.G)}
            if has_liger:
                fns["liger"] = liger(lt, beta)
            for fn in fns.values():  # warm up (first calls import and cache)
                for inp in inputs:
                    fn(inp)
            times: Dict[str, List[float]] = {k: [] for k in fns}
            for r in range(args.rounds):
                for k, fn in fns.items():
                    inp = inputs[r % len(inputs)]
                    t0 = time.perf_counter()
                    fn(inp)
                    times[k].append(time.perf_counter() - t0)
            counts = {k: count(fn, inputs[0]) for k, fn in fns.items()}
            o = min(times["ours"]) * 1e6
            li = min(times["liger"]) * 1e6 if has_liger else float("nan")
            lops, lsync = counts.get("liger", (0, []))
            med = statistics.median(times["ours"]) * 1e6
            print(f"{name:<18} {o:>9.0f} {li:>9.0f} {o / li:>6.2f} {counts['ours'][0]:>9} {lops:>10} "
                  f"{len(counts['ours'][1]):>11} {len(lsync):>12}   median ours {med:.0f}"
                  + (f" liger {statistics.median(times['liger']) * 1e6:.0f}" if has_liger else ""))
            if counts["ours"][1]:
                print(f"   our syncs: {counts['ours'][1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
