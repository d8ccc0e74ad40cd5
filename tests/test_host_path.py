"""The host path of a training step (issue 17): no host-device synchronisation in a forward +
backward of the Triton engine with default settings, counted by bench.host.SyncCounter (a
TorchDispatchMode that flags value reads, nonzero, boolean-mask indexing, data-dependent shapes
and device-to-host copies, inside our custom ops too). The counter is first shown to see planted
syncs, so a count of 0 means something. A new sync on this path fails here.

The one documented exception is the hidden-state route (`fused_linear_grpo_loss`): it reads the
positions of the valid tokens once per call (one `nonzero`), so that the LM-head matmuls skip the
padding; its step is matmul-bound, and packed inputs have no padding to skip. The test pins it to
exactly that one read.

The torch engine (the CPU backend, where a "sync" costs nothing) may read the device: at most
once per vocabulary pass for its runs of valid rows (two nonzero calls) and once for the upstream
gradient (docs/kernels.md).
"""

from __future__ import annotations

import pytest
import torch

import lambda_grpo as lg
from bench.host import SyncCounter

B, T, V, G = 4, 6, 11, 2


def _inputs(seed=0, int_mask=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.25
    return dict(logits=torch.randn(B, T, V, generator=g), tokens=torch.randint(0, V, (B, T), generator=g),
                mask=mask.long() if int_mask else mask, advantages=torch.randn(B, generator=g),
                old_logp=torch.randn(B, T, generator=g) - 2, ref_logp=torch.randn(B, T, generator=g) - 2)


def _syncs(fn) -> list:
    with SyncCounter() as c:
        fn()
    return c.syncs


def test_the_counter_sees_planted_syncs():
    x = torch.randn(8)
    m = x > 0
    assert _syncs(lambda: bool(x.sum() > 0)) == ["_local_scalar_dense"]
    assert _syncs(lambda: x[m]) == ["index with a bool mask"]
    assert _syncs(lambda: m.nonzero()) == ["nonzero"]
    assert _syncs(lambda: x.max().item()) == ["_local_scalar_dense"]
    assert _syncs(lambda: x + 1) == []
    # inside a custom op of ours too: the torch engine reads the upstream gradient on the host
    inp = _inputs()
    logits = inp.pop("logits").requires_grad_(True)
    out = lg.grpo_loss(logits, **inp, group_size=G, config=lg.LossConfig(aggregation="dapo"), backend="torch")
    assert "_local_scalar_dense" in _syncs(lambda: out.loss.backward())


CONFIGS = {
    "dapo": lg.LossConfig(aggregation="dapo"),
    "grpo+kl+entropy": lg.LossConfig(aggregation="grpo", beta=0.04, entropy_coef=0.01),
    "lambda_grpo+both": lg.LossConfig(aggregation="lambda_grpo", trace="both"),  # two-pass schedule
    "lambda_grpo+weight": lg.LossConfig(aggregation="lambda_grpo", trace="recent", trace_mode="weight"),
    "gspo": lg.LossConfig(aggregation="grpo", importance_sampling="sequence"),
}


def _step(route, cfg, int_mask, lam):
    inp = _inputs(int_mask=int_mask)
    kw = dict(group_size=G, old_logp=inp["old_logp"], ref_logp=inp["ref_logp"] if cfg.beta else None, config=cfg,
              lam=lam)
    if route == "logits":
        x = inp["logits"].clone().requires_grad_(True)
        return lambda: lg.grpo_loss(x, inp["tokens"], inp["mask"], inp["advantages"], backend="triton",
                                    **kw).loss.backward()
    if route == "logprobs":
        lp = torch.log_softmax(inp["logits"], -1).gather(-1, inp["tokens"][..., None]).squeeze(-1)
        lp = lp.clone().requires_grad_(True)
        ent = torch.rand(B, T, requires_grad=True)
        return lambda: lg.grpo_loss_from_logprobs(lp, inp["mask"], inp["advantages"], entropy=ent,
                                                  **kw).loss.backward()
    H = 8
    g = torch.Generator().manual_seed(1)
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    return lambda: lg.fused_linear_grpo_loss(h, w, inp["tokens"], inp["mask"], inp["advantages"], backend="triton",
                                             **kw).loss.backward()


@pytest.mark.triton
@pytest.mark.parametrize("int_mask", [False, True], ids=["bool mask", "int mask"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("route", ["logits", "logprobs", "hidden"])
def test_a_training_step_never_synchronises(route, cfg, int_mask):
    config = CONFIGS[cfg]
    lam = torch.tensor(0.3, requires_grad=True) if config.uses_lambda else None
    step = _step(route, config, int_mask, lam)
    step()  # the first call imports and caches
    assert _syncs(step) == (["nonzero"] if route == "hidden" else [])


class _Copies(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops called from lambda_grpo's code that copy a tensor of at least `numel`
    elements (clone, copy_, _to_copy, contiguous's copy), inside our custom ops too (as
    SyncCounter does). Autograd's own slice backward (the gradient of `logits[:, a:b]` written
    into a zero tensor of the full shape) is the caller's graph, not ours: not recorded."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.copies = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._library import custom_ops

        kwargs = kwargs or {}
        if func.namespace != "aten":
            opdef = custom_ops.OPDEFS.get(f"{func.namespace}::{func._opname}")
            if opdef is not None:
                with self:
                    return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten._to_copy,
                                   torch.ops.aten._unsafe_view) and isinstance(out, torch.Tensor) \
                and out.numel() >= self.numel:
            import traceback

            ours = [f for f in traceback.extract_stack() if "/lambda_grpo/" in f.filename.replace("\\", "/")]
            if ours:
                self.copies.append(f"{func} at {ours[-1].filename.split('/')[-1]}:{ours[-1].lineno}")
        return out


@pytest.mark.triton
@pytest.mark.parametrize("cfg", ["dapo", "lambda_grpo+both"])
def test_a_slice_of_the_model_logits_is_read_where_it_lies(cfg):
    """`model(ids).logits[:, P-1:-1]` is strided along T: the Triton kernels read it with its batch
    and row strides (kernels/_launch.py:row_layout), so no (B, T, V) copy is made in the forward
    or the backward (one was, before: 2 B T V bytes of traffic and a second buffer per step), and
    the loss and gradient equal those of the same logits made contiguous, bit for bit. The copies
    are counted with the launches stubbed (the interpreter itself copies each kernel's tensors)."""
    from bench.host import stubbed_launches

    config = CONFIGS[cfg]
    inp = _inputs()
    full = torch.randn(B, T + 3, V, generator=torch.Generator().manual_seed(7))
    full[:, 1:-2] = inp["logits"]

    def step(sliced):
        base = full.clone().requires_grad_(True)
        x = base[:, 1:-2] if sliced else base[:, 1:-2].detach().contiguous().requires_grad_(True)
        lam = torch.tensor(0.3, requires_grad=True) if config.uses_lambda else None
        out = lg.grpo_loss(x, inp["tokens"], inp["mask"], inp["advantages"], G, inp["old_logp"], config=config,
                           lam=lam, backend="triton")
        out.loss.backward()
        return x, out.loss.detach(), (base.grad[:, 1:-2] if sliced else x.grad)

    with stubbed_launches(), _Copies(B * T * V) as c:
        x, _, _ = step(True)
    assert x.stride(1) == V and x.stride(0) == (T + 3) * V  # a real slice
    assert c.copies == [], f"copies of the logits: {c.copies}"
    (l1, g1), (l2, g2) = step(True)[1:], step(False)[1:]
    assert torch.equal(l1, l2), (l1, l2)
    assert torch.equal(g1, g2), f"max |diff| {float((g1 - g2).abs().max())}"
