"""Two gloo ranks running verl 0.9.1's real actor update with λ-GRPO (issue 19), and the project's
own trainer step on the full batch as the reference. Run by tests/test_integration_verl_lambda.py:

    python -m tests._verl_lambda_dist OUT

writes OUT/rank{0,1}.json (scalars; λ as float.hex, so bit-identity can be checked), OUT/rank0.pt
(gradients and parameters gathered from the FSDP2 shards) and OUT/reference.pt. What each rank does,
from the same initial weights and the same rank shares (tests/_verl_harness.py):

1. `LambdaTrainingWorker` driven as `ActorRolloutRefWorker.init_model` drives its actor worker
   (`reset`, `set_loss_fn(partial(ppo_loss, config=actor_config))`), one `train_mini_batch` on the
   rank's share (8 rows, 4 micro-batches of 2; every group spread over both ranks and over
   micro-batches): dλ, λ, the gradient the optimiser used, the parameters after the step;
2. `save_checkpoint(dir, global_step=1)`, a second step (the uninterrupted run), `load_checkpoint`
   and the second step again on the same worker;
3. a fresh `LambdaTrainingWorker` with `lambda_init = 0`: its loss at λ = 0 against verl's
   `ppo_loss` with `loss_mode=vanilla` (forward only, `infer_batch`, same weights and batch), then
   `load_checkpoint` and the second step, on a batch without `uid` (the group fields only);
4. fp16 loss scaling: the saved state loaded again and the second step under a `ShardedGradScaler`
   (what verl's FSDP engine builds for fp16 parameters), once with a scale of 2^10 (dλ must be
   unscaled: same λ as step 2) and once with a scale that overflows the gradients (the engine skips
   its update: λ must not move);
5. `LambdaActorRolloutRefWorker` (role "actor") built from verl's generated trainer yaml with the
   recipe's overrides, `init_model`, `update_actor` on the same share: the λ of step 1.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import sys

from tests import _verl_harness as H

H.setup()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WORLD, B, G, MICRO = 2, 16, 4, 2
LR, CLIP, WEIGHT_DECAY = 1e-2, 0.02, 0.01
LAMBDA_INIT, LAMBDA_LR = 0.5, 0.5
CLIP_LOW, CLIP_HIGH, CLIP_C = 0.2, 0.28, 3.0


def _actor_config(model_dir, lambda_init=LAMBDA_INIT, loss_mode="lambda_grpo"):
    from verl.workers.config import PolicyLossConfig

    from lambda_grpo.integrations.verl import LambdaGRPOPolicyLossConfig

    pl = (LambdaGRPOPolicyLossConfig(loss_mode=loss_mode, lambda_lr=LAMBDA_LR, lambda_init=lambda_init)
          if loss_mode == "lambda_grpo" else PolicyLossConfig(loss_mode=loss_mode))
    return H.actor_config(model_dir, pl, micro=MICRO, lr=LR, clip_grad=CLIP, weight_decay=WEIGHT_DECAY,
                          clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH, clip_ratio_c=CLIP_C)


def _worker(model_dir, lambda_init=LAMBDA_INIT):
    from verl.workers.utils.losses import ppo_loss

    from lambda_grpo.integrations.verl import LambdaTrainingWorker

    cfg = _actor_config(model_dir, lambda_init)
    w = LambdaTrainingWorker(config=H.training_worker_config(cfg, MICRO))
    w.reset()
    w.set_loss_fn(functools.partial(ppo_loss, config=cfg))
    return w, cfg


def _full(w, what):
    """Every parameter's gradient or value, gathered from the FSDP2 shards (a collective)."""
    out = {}
    for name, p in w.engine.module.named_parameters():
        t = p.grad if what == "grad" else p.detach()
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
    return out


def _with(cfg, **fields):
    import copy

    cfg = copy.deepcopy(cfg)
    for k, v in fields.items():
        object.__setattr__(cfg, k, v)
    return cfg


def _metrics(output):
    from verl.utils import tensordict_utils as tu

    return None if output is None else tu.get(output, "metrics")


def _save(out, rank, res, tensors, phase) -> None:
    """What the rank has so far, after each phase: a later phase that fails (a planted fault) still
    leaves the earlier numbers for the tests to judge."""
    res.setdefault("phases", []).append(phase)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f, indent=1)
    if rank == 0:
        torch.save(tensors, os.path.join(out, "rank0.pt"))


def _hex(x: float) -> str:
    return float(x).hex()


def run(rank, out, model_dir, shares):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out, "rdzv"), rank=rank, world_size=WORLD)
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import TrainingWorker
    from verl.workers.utils.losses import ppo_loss

    from lambda_grpo.integrations.verl import (GROUP_INDEX_KEY, GROUP_LENGTHS_KEY, LambdaActorRolloutRefWorker,
                                               LambdaTrainingWorker)

    share = shares[rank]
    ckpt = os.path.join(out, "ckpt", "global_step_1", "actor")
    res, tensors = {"rank": rank}, {}

    # 1. one verl update with λ-GRPO
    w, cfg = _worker(model_dir)
    res["lam_init"] = _hex(w.lambda_state.value)
    res["lam_init_dim"] = w.lambda_state.lam.dim()
    data = pickle.loads(share)
    given = (data[GROUP_LENGTHS_KEY].clone(), data[GROUP_INDEX_KEY].clone())
    # the gradient the optimiser uses (after verl's clipping; verl zeroes it when it leaves train mode)
    hook = w.engine.optimizer.register_step_pre_hook(lambda *_, w=w: tensors.update(grads1=_full(w, "grad")))
    m1 = _metrics(w.train_mini_batch(data))
    hook.remove()
    res["groups_rewritten_equal"] = bool(torch.equal(data[GROUP_LENGTHS_KEY], given[0])
                                         and torch.equal(data[GROUP_INDEX_KEY], given[1]))
    res["dlam1"], res["lam1"] = w.lambda_state.last_grad, _hex(w.lambda_state.value)
    res["grad_norm1"] = float(m1["grad_norm"][0])
    res["metric_lambda1"] = [float(x) for x in m1["actor/lambda"]] if "actor/lambda" in m1 else None
    res["metric_lambda_grad1"] = [float(x) for x in m1["actor/lambda_grad"]]
    res["loss1"] = float(m1["loss"][0])
    tensors["params1"] = _full(w, "param")

    _save(out, rank, res, tensors, "update")

    # 2. checkpoint, the uninterrupted second step, load, the second step again
    w.save_checkpoint(ckpt, global_step=1)
    res["ckpt_files"] = sorted(f for f in os.listdir(ckpt) if f.startswith("lambda_grpo"))
    w.train_mini_batch(pickle.loads(share))
    res["lam2"] = _hex(w.lambda_state.value)
    tensors["params2"] = _full(w, "param")
    w.load_checkpoint(ckpt)
    res["lam_reloaded_same"] = _hex(w.lambda_state.value)
    w.train_mini_batch(pickle.loads(share))
    res["lam2_same"] = _hex(w.lambda_state.value)
    tensors["params2_same"] = _full(w, "param")

    _save(out, rank, res, tensors, "checkpoint")

    # 3. a fresh worker: λ = 0 against verl's ppo_loss (vanilla), then restore and step 2
    w2, cfg0 = _worker(model_dir, lambda_init=0.0)
    res["lam_fresh"] = _hex(w2.lambda_state.value)
    res["loss_lambda0"] = float(_metrics(w2.infer_batch(pickle.loads(share)))["loss"])
    TrainingWorker.set_loss_fn(w2, functools.partial(ppo_loss, config=_actor_config(model_dir, loss_mode="vanilla")))
    res["loss_vanilla"] = float(_metrics(w2.infer_batch(pickle.loads(share)))["loss"])
    w2.set_loss_fn(functools.partial(ppo_loss, config=cfg0))
    w2.load_checkpoint(ckpt)
    res["lam_reloaded_fresh"] = _hex(w2.lambda_state.value)
    no_uid = pickle.loads(share)
    del no_uid["uid"]
    w2.train_mini_batch(no_uid)
    res["lam2_fresh"] = _hex(w2.lambda_state.value)
    tensors["params2_fresh"] = _full(w2, "param")
    del w2

    _save(out, rank, res, tensors, "fresh")

    # 4. fp16 loss scaling (verl's ShardedGradScaler on the same engine): unscaled dλ; a skipped update
    for name, scale in (("scaled", 2.0 ** 10), ("overflow", 3.0e38)):
        w.load_checkpoint(ckpt)
        w.engine.scaler = ShardedGradScaler(device="cpu", init_scale=scale)
        m = _metrics(w.train_mini_batch(pickle.loads(share)))
        w.engine.scaler = None
        res[f"lam2_{name}"] = _hex(w.lambda_state.value)
        res[f"dlam2_{name}"] = w.lambda_state.last_grad
        res[f"grad_norm2_{name}"] = float(m["grad_norm"][0])
        tensors[f"params2_{name}"] = _full(w, "param")
    # a rank without its λ file: the load is refused on every rank, not left with two λs
    bad = os.path.join(out, "ckpt_bad")
    w.save_checkpoint(bad, global_step=2)
    w.train_mini_batch(pickle.loads(share))  # λ moves on: a rank that does not restore keeps another λ
    if rank == 1:
        os.remove(os.path.join(bad, f"lambda_grpo_world_size_{WORLD}_rank_1.json"))
    dist.barrier()
    try:
        w.load_checkpoint(bad)
    except ValueError as e:
        res["mismatch_error"] = str(e)
    # what set_loss_fn refuses (before it changes anything)
    res["refusals"] = {}
    for name, fn in (("vanilla", functools.partial(ppo_loss, config=_actor_config(model_dir, loss_mode="vanilla"))),
                     ("seq-mean", functools.partial(ppo_loss, config=_with(cfg, loss_agg_mode="seq-mean-token-mean"))),
                     ("plain function", ppo_loss)):
        try:
            w.set_loss_fn(fn)
        except ValueError as e:
            res["refusals"][name] = str(e)
    del w

    _save(out, rank, res, tensors, "fp16")

    # 5. the ActorRolloutRefWorker subclass, from verl's trainer yaml
    arr_cfg = H.actor_rollout_ref_config(
        model_dir, {"_target_": "lambda_grpo.integrations.verl.LambdaGRPOPolicyLossConfig", "loss_mode": "lambda_grpo",
                    "lambda_lr": LAMBDA_LR, "lambda_init": LAMBDA_INIT},
        micro=MICRO, lr=LR, clip_grad=CLIP, weight_decay=WEIGHT_DECAY)
    aw = LambdaActorRolloutRefWorker(config=arr_cfg, role="actor")
    aw.init_model()
    res["arr_actor_cls"] = type(aw.actor).__name__
    res["arr_is_lambda_worker"] = isinstance(aw.actor, LambdaTrainingWorker)
    ma = aw.update_actor(pickle.loads(share))
    res["arr_lam1"] = _hex(aw.actor.lambda_state.value)
    res["arr_metrics"] = sorted(tu.get(ma, "metrics")) if ma is not None else None
    tensors["arr_params1"] = _full(aw.actor, "param")

    _save(out, rank, res, tensors, "actor_rollout_ref")
    dist.barrier()
    dist.destroy_process_group()


def reference(model_dir, td, group):
    """The project's own trainer step (lambda_grpo/trainer/loop.py: GRPOLoss owning λ, AdamW for the
    model, gradient clipping of the model's parameters, SGD for λ) on the full batch in one process,
    its rows put back into contiguous groups (group_size=G, no group lengths needed)."""
    import lambda_grpo as lg

    model = H.load_model(model_dir)
    model.train()
    order = torch.argsort(group, stable=True)
    b = {k: td[k][order] for k in ("input_ids", "attention_mask", "position_ids", "responses", "response_mask",
                                   "old_log_probs", "advantages")}
    assert torch.equal(group[order], torch.arange(B) // G)
    loss_fn = lg.GRPOLoss(lg.LossConfig(aggregation="lambda_grpo", eps_low=CLIP_LOW, eps_high=CLIP_HIGH,
                                        dual_clip=CLIP_C), lam_init=LAMBDA_INIT)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY)
    lam_opt = torch.optim.SGD([loss_fn.lam], lr=LAMBDA_LR)
    opt.zero_grad(set_to_none=True)
    lam_opt.zero_grad(set_to_none=True)
    logp = H.response_logprobs(model, b["input_ids"], b["attention_mask"], b["position_ids"], b["responses"])
    mask = b["response_mask"].bool()
    out = loss_fn.forward_logprobs(logp, mask, b["advantages"][:, 0], G, old_logp=b["old_log_probs"])
    out.loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, CLIP))
    res = {"loss": float(out.loss.detach()), "dlam": float(loss_fn.lam.grad), "grad_norm": grad_norm,
           "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}}
    opt.step()
    lam_opt.step()
    res["lam"] = float(loss_fn.lam.detach())
    res["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    # λ = 0 is dapo: the same batch's loss at λ = 0 (the per-rank verl losses sum to it)
    with torch.no_grad():
        res["loss_lambda0"] = float(lg.grpo_loss_from_logprobs(
            H.response_logprobs(H.load_model(model_dir), b["input_ids"], b["attention_mask"], b["position_ids"],
                                b["responses"]),
            mask, b["advantages"][:, 0], G, old_logp=b["old_log_probs"], lam=torch.tensor(0.0),
            config=loss_fn.config).loss)
    # the same AdamW replayed on verl's own (clipped) gradient from the same weights: the optimisers agree
    verl_out = os.path.join(os.path.dirname(model_dir), "rank0.pt")
    if not os.path.exists(verl_out) or "grads1" not in torch.load(verl_out):
        return res
    verl_grads = torch.load(verl_out)["grads1"]
    replay = H.load_model(model_dir)
    rparams = [p for p in replay.parameters() if p.requires_grad]
    for n, p in replay.named_parameters():
        p.grad = verl_grads[n].clone()
    torch.optim.AdamW(rparams, lr=LR, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY).step()
    res["params_replay"] = {n: p.detach().clone() for n, p in replay.named_parameters()}
    return res


def main(out: str) -> None:
    torch.set_num_threads(1)
    model_dir = H.build_model(os.path.join(out, "model"))
    model = H.load_model(model_dir)
    td, group = H.global_batch(model, B=B, G=G)
    shares = H.rank_shares(td, WORLD, mini_batch_size=B)
    from verl.utils import tensordict_utils as tu

    rows = [list(tu.get(pickle.loads(s), "uid")) for s in shares]
    with open(os.path.join(out, "layout.json"), "w") as f:
        json.dump({"rank_uids": rows}, f)
    try:
        mp.start_processes(run, args=(out, model_dir, shares), nprocs=WORLD, start_method="fork")
    finally:  # also after a failed rank: the tests judge what the ranks saved against it
        torch.save(reference(model_dir, td, group), os.path.join(out, "reference.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
