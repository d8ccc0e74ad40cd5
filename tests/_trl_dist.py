"""The two-process TRL runs of tests/test_integration_trl.py, under
`torchrun --standalone --nproc_per_node 2 -m tests._trl_dist MODEL_DIR OUT_DIR` (gloo, use_cpu=True).

One launch does everything, so the imports are paid once:
- parity: TRL's GRPOTrainer and LambdaGRPOTrainer, 3 steps each, for grpo, bnpo, dapo, dr_grpo and
  the VARIANTS of tests/_trl_tiny.py (cispo, sapo, luspo, delta, KL x ratio);
- a λ-GRPO run and a GRPO-λ run (loss_type="lambda_grpo", trace="both") with G = 16, so that each
  group spans both ranks, checkpointing every step, then each resumed from checkpoint-2 and
  trained to step 3 again; and TRL's dapo with G = 16 for one step (λ = 0 is dapo).
Each rank writes OUT_DIR/rank{r}.json: the log lines, λ per run, the λ it read back on resume,
and for every row the loss saw in the λ runs its prompt, length, group_lengths and group_index.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from tests._trl_tiny import VARIANTS, dump, run

LAMBDA_RUN = dict(num_generations=16)


def lambda_runs(model_dir, out, rank, result, **extra):
    from lambda_grpo.integrations import trl as lg_trl

    rows, loaded = [], []

    class Probe(lg_trl.LambdaGRPOTrainer):
        def _compute_loss(self, model, inputs):
            if self.model.training:
                pm, cm = inputs["prompt_mask"].bool(), inputs["completion_mask"].bool()
                for i in range(pm.shape[0]):
                    rows.append(dict(round=self.state.global_step // self.args.num_iterations,
                                     prompt=inputs["prompt_ids"][i][pm[i]].tolist(), n=int(cm[i].sum()),
                                     gl=inputs["group_lengths"][i].tolist(), gi=int(inputs["group_index"][i])))
            return super()._compute_loss(model, inputs)

        def _load_optimizer_and_scheduler(self, checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
            if checkpoint is not None:
                loaded.append(float(self.lam.detach()))

    original = lg_trl.LambdaGRPOTrainer
    lg_trl.LambdaGRPOTrainer = Probe  # run() looks the class up in the module
    try:
        steps, tr = run("ours", "lambda_grpo", out, model_dir, save_strategy="steps", save_steps=1, **extra)
        first = dict(steps=steps, lam=float(tr.lam.detach()), rows=list(rows))
        saved = torch.load(os.path.join(out, "checkpoint-2", "lambda_grpo_state.pt"), weights_only=True)
        steps2, tr2 = run("ours", "lambda_grpo", out, model_dir, resume=os.path.join(out, "checkpoint-2"),
                          save_strategy="steps", save_steps=1, **extra)
        result.update(first, saved_ckpt2=float(saved["lambda"]), loaded=loaded, resumed_steps=steps2,
                      resumed_lam=float(tr2.lam.detach()))
    finally:
        lg_trl.LambdaGRPOTrainer = original


def main(model_dir, out_dir):
    rank = int(os.environ["RANK"])
    res = {"world": int(os.environ["WORLD_SIZE"]), "times": {}}
    only = os.environ.get("LG_TRL_ONLY")
    runs = {lt: (lt, {}) for lt in ("grpo", "bnpo", "dapo", "dr_grpo")}
    runs.update(VARIANTS)
    for lt, (loss_type, extra) in runs.items():
        if only and lt not in only.split(","):
            continue
        for kind in ("trl", "ours"):
            t = time.time()
            steps, tr = run(kind, loss_type, os.path.join(out_dir, f"{kind}-{lt}"), model_dir, **extra)
            res[f"{kind}-{lt}"] = steps
            res["times"][f"{kind}-{lt}"] = time.time() - t
            assert tr.accelerator.num_processes == 2, "not a 2-process run"
    # λ runs: G = 16 completions of one prompt per generation batch, so that every group is spread
    # over both ranks and over micro-batches (with G = 4 each rank would hold whole groups)
    if not only or "lambda_grpo" in only.split(","):
        t = time.time()
        res["trl-dapo-g16"] = run("trl", "dapo", os.path.join(out_dir, "trl-dapo-g16"), model_dir, max_steps=1,
                                  **LAMBDA_RUN)[0]
        res["times"]["trl-dapo-g16"] = time.time() - t
    for name, extra in (("lambda_grpo", {}), ("grpo_lambda", {"trace": "both"})):
        if only and name not in only.split(","):
            continue
        t = time.time()
        res[name] = {}
        lambda_runs(model_dir, os.path.join(out_dir, name), rank, res[name], lambda_lr=5.0, **LAMBDA_RUN, **extra)
        res["times"][name] = time.time() - t
    dump(res, os.path.join(out_dir, f"rank{rank}.json"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
