"""verl 0.9.1's real actor update on a CPU, without Ray or a GPU: the harness of
tests/test_integration_verl_lambda.py (issue 19). Import it first, in a process of its own: it
changes that process for good (stand-in modules, verl's platform, environment variables).

What it takes, and why (everything else is verl's own code: worker, engine, loss, checkpoints):
- stand-ins for modules that verl imports at module level but never uses on the actor-update path,
  installed only when the real one is not importable: `ray` (`ray.remote` a pass-through
  decorator, and the `ray.util`, `ray.actor`, `ray.experimental`, `ray._private` names verl
  imports), `uvicorn`, `fastapi` (rollout server utilities), `peft` (LoRA, not used);
- `trl` hidden (sys.modules["trl"] = None): verl's monkey patch reaches for
  `AutoModelForCausalLMWithValueHead`, which TRL 1.16 no longer has;
- a CPU platform registered with verl's own `PlatformRegistry` (device "cpu", backend gloo, no-op
  memory functions), selected with VERL_PLATFORM=cpu; VERL_ENGINE_DEVICE=cuda, because the FSDP
  engine registers itself only for cuda and npu;
- the tiny Qwen2 built from a config (nothing downloaded), with tied embeddings (rank 1 would build
  it on the meta device otherwise, which transformers' kernelize refuses), loaded with sdpa
  attention (verl defaults to flash-attention-2), `use_remove_padding=False`, FSDP2 (FSDP1
  refuses CPU parameters with sync_module_states), no torch.compile, fp32.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import os
import pickle
import sys
import types

import torch


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    m.__path__ = []
    m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    sys.modules[name] = m
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, m)
    return m


class _Unused:
    """A name verl imports but the actor update never calls."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("a stand-in of tests/_verl_harness.py was called: the path under test needs the real "
                           "module")


def _remote(*args, **kwargs):
    if len(args) == 1 and not kwargs and callable(args[0]):
        return args[0]
    return lambda f: f


def install_stand_ins() -> None:
    if importlib.util.find_spec("ray") is None:
        _module("ray", ObjectRef=type("ObjectRef", (), {}), remote=_remote, is_initialized=lambda: False)
        _module("ray.actor", ActorHandle=type("ActorHandle", (), {}))
        _module("ray.util", placement_group_table=_Unused, list_named_actors=_Unused)
        _module("ray.util.collective")
        _module("ray.util.scheduling_strategies", NodeAffinitySchedulingStrategy=_Unused,
                PlacementGroupSchedulingStrategy=_Unused)
        _module("ray.util.placement_group", PlacementGroup=_Unused, placement_group=_Unused)
        _module("ray.experimental")
        _module("ray.experimental.state")
        _module("ray.experimental.state.api", get_actor=_Unused)
        _module("ray._private")
        _module("ray._private.runtime_env")
        _module("ray._private.runtime_env.constants", RAY_JOB_CONFIG_JSON_ENV_VAR="RAY_JOB_CONFIG_JSON_ENV_VAR")
    for name in ("uvicorn", "fastapi"):
        if importlib.util.find_spec(name) is None:
            _module(name, FastAPI=_Unused, Config=_Unused, Server=type("Server", (), {}))
    if importlib.util.find_spec("peft") is None:
        _module("peft", LoraConfig=_Unused, TaskType=_Unused, get_peft_model=_Unused,
                PeftModel=type("PeftModel", (), {}))
        _module("peft.utils")
        _module("peft.utils.save_and_load", get_peft_model_state_dict=_Unused)
        _module("peft.tuners")
        _module("peft.tuners.lora", LoraLayer=type("LoraLayer", (), {}))
    sys.modules["trl"] = None  # verl.models.transformers.monkey_patch: is_trl_available() -> False


def _cpu_device_module() -> types.ModuleType:
    m = types.ModuleType("verl_cpu_device")
    for name in ("empty_cache", "synchronize", "reset_peak_memory_stats", "set_device"):
        setattr(m, name, lambda *a, **k: None)
    for name in ("max_memory_allocated", "max_memory_reserved", "memory_allocated", "memory_reserved"):
        setattr(m, name, lambda *a, **k: 0)
    m.mem_get_info = lambda *a, **k: (0, 0)
    m.get_device_name = lambda *a, **k: "cpu"
    m.get_rng_state, m.set_rng_state = torch.get_rng_state, torch.set_rng_state
    m.manual_seed = m.manual_seed_all = torch.manual_seed
    m.is_available = lambda: True
    m.current_device = lambda: "cpu"
    m.device_count = lambda: 1
    return m


def register_cpu_platform() -> None:
    os.environ["VERL_PLATFORM"] = "cpu"
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry

    device_module = _cpu_device_module()

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"

        @property
        def device_module(self):
            return device_module

        def is_available(self):
            return True

        def current_device(self):
            return "cpu"  # tensors and TensorDicts go .to("cpu")

        def device_count(self):
            return 1

        def set_device(self, device_index):
            pass

        def synchronize(self, device_index=None):
            pass

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings):
            pass

        def empty_cache(self):
            pass

        def get_device_capability(self, device_index=0):
            return None, None

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg):
            yield

        def profiler_start(self):
            pass

        def profiler_stop(self):
            pass

        def ray_resource_name(self):
            return "CPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        def cudart(self):
            return None


def setup() -> None:
    """Stand-ins, then verl (which loads lambda_grpo's plug-in), then the CPU platform."""
    install_stand_ins()
    import verl  # noqa: F401

    register_cpu_platform()


# --------------------------------------------------------------------------------------------
# the tiny model, the configs as verl's ActorRolloutRefWorker.init_model builds them, the batch
# --------------------------------------------------------------------------------------------
VOCAB, P, R = 64, 4, 6


def build_model(path: str, seed: int = 0) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def load_model(path: str):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)


MODEL_OVERRIDES = dict(load_tokenizer=False, use_remove_padding=False, enable_gradient_checkpointing=False,
                       override_config={"attn_implementation": "sdpa"})
FSDP = dict(strategy="fsdp2", use_torch_compile=False, model_dtype="fp32",
            mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"})


def actor_config(model_path: str, policy_loss, *, micro: int, lr: float, clip_grad: float, weight_decay: float,
                 **fields):
    from verl.workers.config import FSDPActorConfig, FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig

    cfg = FSDPActorConfig(strategy="fsdp2", rollout_n=4, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=micro,
                          use_torch_compile=False, loss_agg_mode="token-mean", policy_loss=policy_loss,
                          optim=FSDPOptimizerConfig(lr=lr, clip_grad=clip_grad, weight_decay=weight_decay),
                          fsdp_config=FSDPEngineConfig(**FSDP), **fields)
    cfg.model_config = HFModelConfig(path=model_path, **MODEL_OVERRIDES)
    return cfg


def training_worker_config(actor_cfg, micro: int):
    """TrainingWorkerConfig exactly as ActorRolloutRefWorker.init_model builds the actor's."""
    from verl.workers.config import TrainingWorkerConfig

    twc = TrainingWorkerConfig(model_type="language_model", model_config=actor_cfg.model_config,
                               engine_config=actor_cfg.engine, optimizer_config=actor_cfg.optim,
                               checkpoint_config=actor_cfg.checkpoint)
    twc.engine_config.use_dynamic_bsz = False
    twc.engine_config.infer_micro_batch_size_per_gpu = micro
    twc.engine_config.micro_batch_size_per_gpu = micro
    twc.engine_config.use_remove_padding = False
    return twc


def actor_rollout_ref_config(model_path: str, policy_loss: dict, *, micro: int, lr: float, clip_grad: float,
                             weight_decay: float):
    """verl's generated trainer yaml (actor_rollout_ref), with the recipe's overrides: what a verl run
    hands ActorRolloutRefWorker."""
    from omegaconf import OmegaConf

    import verl

    root = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer/config/_generated_ppo_trainer.yaml"))
    a = root.actor_rollout_ref
    a.model.path = model_path
    for k, v in MODEL_OVERRIDES.items():
        OmegaConf.update(a.model, k, v, force_add=True)
    a.rollout.n = 4
    a.rollout.log_prob_micro_batch_size_per_gpu = micro
    a.actor.update(strategy="fsdp2", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=micro, use_torch_compile=False,
                   loss_agg_mode="token-mean", clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    a.actor.optim.update(lr=lr, clip_grad=clip_grad, weight_decay=weight_decay)
    a.actor.fsdp_config.update(FSDP)
    for k, v in policy_loss.items():
        OmegaConf.update(a.actor.policy_loss, k, v, force_add=True)
    OmegaConf.resolve(root)
    return root.actor_rollout_ref


def global_batch(model, *, B: int = 16, G: int = 4, seed: int = 0):
    """A verl actor batch (left-padded prompts, right-padded responses) of B rows in B // G groups,
    rows shuffled (as verl's balance_batch does) so that every group is spread over ranks and
    micro-batches. old_log_probs are the model's own log-probs plus noise (ratios off 1: the clip
    binds); advantages are group-normalised rewards, constant along each row. Returns the padded
    TensorDict (with uid and the group fields) and the group id of each row."""
    from tensordict import NonTensorStack, TensorDict

    from lambda_grpo.integrations.verl import GROUP_INDEX_KEY, GROUP_LENGTHS_KEY, group_lengths_from_uid

    g = torch.Generator().manual_seed(seed)
    group = torch.arange(B) // G
    plen = torch.randint(1, P + 1, (B,), generator=g)
    rlen = torch.randint(1, R + 1, (B,), generator=g)
    rlen[::5] = R  # some full rows
    pm = (torch.arange(P)[None] >= (P - plen)[:, None]).long()
    rm = (torch.arange(R)[None] < rlen[:, None]).long()
    prompts = torch.randint(1, VOCAB, (B, P), generator=g) * pm
    responses = torch.randint(1, VOCAB, (B, R), generator=g) * rm
    reward = torch.randn(B, generator=g)
    gr = reward.view(-1, G)
    adv = ((gr - gr.mean(1, keepdim=True)) / (gr.std(1, keepdim=True) + 1e-6)).flatten()
    perm = torch.randperm(B, generator=g)
    prompts, responses, pm, rm, adv, group = prompts[perm], responses[perm], pm[perm], rm[perm], adv[perm], group[perm]
    am = torch.cat([pm, rm], 1)
    input_ids = torch.cat([prompts, responses], 1)
    pos = (am.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logp = response_logprobs(model, input_ids, am, pos, responses)
    old = (logp + 0.3 * torch.randn(B, R, generator=g)) * rm
    td = TensorDict({"prompts": prompts, "responses": responses, "input_ids": input_ids, "attention_mask": am,
                     "position_ids": pos, "response_mask": rm, "old_log_probs": old,
                     "advantages": adv[:, None].expand(B, R).contiguous() * rm}, batch_size=[B])
    uid = [f"prompt-{int(k)}" for k in group]
    td["uid"] = NonTensorStack(*uid)
    gl, gi = group_lengths_from_uid(uid, rm)
    td[GROUP_LENGTHS_KEY], td[GROUP_INDEX_KEY] = gl, gi
    return td, group


def response_logprobs(model, input_ids, attention_mask, position_ids, responses):
    """log π(response token) at temperature 1, as verl's logprobs_from_logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits
    lp = torch.log_softmax(logits[:, P - 1:-1].float(), dim=-1)
    return lp.gather(-1, responses[..., None]).squeeze(-1)


def rank_shares(td, world: int, *, mini_batch_size: int, extra=None) -> list:
    """Each rank's contiguous share as verl's trainer and dispatch produce it: left_right_2_no_padding,
    the trainer's extra_info, BatchData(td).chunk(world), pickled (Ray's object store)."""
    from verl.protocol import BatchData
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    td = left_right_2_no_padding(td.clone())
    info = dict(temperature=1.0, global_batch_size=mini_batch_size, mini_batch_size=mini_batch_size, epochs=1, seed=42,
                dataloader_kwargs={"shuffle": False}, calculate_entropy=False, distillation_use_topk=False,
                distillation_only=False)
    info.update(extra or {})
    tu.assign_non_tensor(td, **info)
    return [pickle.dumps(share) for share in BatchData(td).chunk(world)]
