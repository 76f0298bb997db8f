"""What each stage of a pipeline needs of every GPU's memory, from the models' configs alone (``pmrlhf plan``).

Nothing is downloaded or allocated. Parameter counts come from the model built on PyTorch's meta device, and the
activations a training step keeps for its backward pass from a forward pass on that device at the stage's real
batch and lengths: every tensor autograd saves is counted by its shape and type (``saved_tensors_hooks``), so
the figure is the implementation's own, not a formula's. The rest follows from how the stages hold their
models:

* a trained model keeps float32 weights (mixed precision computes in bf16), float32 gradients and AdamW's two
  float32 moments: 16 bytes a parameter under DDP; under DeepSpeed ZeRO-2 bf16 weights whole, gradients and the
  float32 master weights and moments sharded (2 + 14 / N); under FSDP all of it sharded (16 / N) plus the
  gathered bf16 weights of the layer at work;
* under mixed precision autocast keeps a bf16 copy of every weight it used until the backward pass (2 bytes;
  not under DeepSpeed, whose bf16 engine computes with its bf16 weights);
* a frozen model (PPO's reference and reward model, DPO's reference while it scores) is held whole in bf16 on
  every GPU, as the stages never shard it; with LoRA it is the trained model's base and holds nothing more;
* the token log-probabilities peak at three chunks of float32 logits (``scoring.CHUNK_BYTES``) where the
  architecture allows chunking, else at three batches of them;
* PPO's sampling keeps a bf16 KV cache of every layer for its prompts and new tokens.

A stage's peak is its models' state plus the largest of its passes. Allocator slack and the CUDA context
(about 0.5-1 GiB a GPU) come on top.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from pmrlhf.config import InputError, ModelConfig, read_yaml
from pmrlhf.models.sampling import SAMPLING_BATCH

GIB = 2**30

# The recipes' models, as their config.json on the Hub gives them: a plan needs no download.
KNOWN_CONFIGS = {
    "facebook/opt-1.3b": dict(
        model_type="opt",
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=32,
        ffn_dim=8192,
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=2048,
    ),
    "facebook/opt-350m": dict(
        model_type="opt",
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        ffn_dim=4096,
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=512,
    ),
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "meta-llama/Llama-3.2-1B": dict(
        model_type="llama",
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        head_dim=64,
    ),
    "meta-llama/Llama-3.2-3B": dict(
        model_type="llama",
        hidden_size=3072,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        head_dim=128,
    ),
    "fetch:smollm2": dict(  # SmolLM2-135M-Instruct, as pmrlhf fetch smollm2 converts it
        model_type="llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        head_dim=64,
    ),
}


@dataclass
class Launch:
    """How the processes share the work: ``ddp``, ``zero2`` or ``fsdp``, on ``gpus`` processes."""

    strategy: str = "ddp"
    gpus: int = 1
    mixed_precision: str = "bf16"

    @classmethod
    def from_accelerate(cls, path: str | Path | None, gpus: int | None = None) -> Launch:
        """The launch an ``accelerate`` config file describes (one process without a file)."""
        if gpus is not None and gpus < 1:
            raise InputError(f"--gpus must be >= 1, got {gpus}")
        if path is None:
            return cls(gpus=gpus or 1)
        if not Path(path).is_file():
            raise InputError(f"accelerate config {path} does not exist (accelerate config writes one)")
        data = read_yaml(Path(path)) or {}
        if not isinstance(data, dict):
            raise InputError(f"{path}: not an accelerate config (a mapping of its settings)")
        kind = data.get("distributed_type", "NO")
        strategy = {"FSDP": "fsdp", "DEEPSPEED": "zero2"}.get(kind, "ddp")
        if strategy == "zero2" and int(data.get("deepspeed_config", {}).get("zero_stage", 2)) != 2:
            raise InputError(f"{path}: only ZeRO-2 is supported (the stages refuse ZeRO-3)")
        return cls(strategy, gpus or int(data.get("num_processes", 1)), data.get("mixed_precision", "bf16"))


def model_config(name_or_path: str):
    """The transformers config of a model: a local folder's, the Hub cache's, or ``KNOWN_CONFIGS``."""
    from transformers import AutoConfig

    if name_or_path in KNOWN_CONFIGS:
        known = dict(KNOWN_CONFIGS[name_or_path])
        return AutoConfig.for_model(known.pop("model_type"), **known)
    try:
        return AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except OSError:
        raise InputError(
            f"no config of {name_or_path!r} here: give a local model folder, or one of {sorted(KNOWN_CONFIGS)}"
        ) from None


def meta_model(config, reward: bool = False, dtype=torch.bfloat16, attention: str = "sdpa"):
    """The model of ``config`` on the meta device: shapes and types, no memory."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = config.__class__(**config.to_dict())
    if reward:
        config.num_labels = 1
        config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    cls = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    with torch.device("meta"):
        return cls.from_config(config, dtype=dtype, attn_implementation=attention)


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def saved_for_backward(model, fn) -> int:
    """Bytes of the tensors autograd keeps from ``fn()`` for its backward pass: each storage once (views share
    one), the model's own weights left out (they are held anyway)."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _mask_values_unread():
        fn()
    return sum(seen.values())


@contextlib.contextmanager
def _mask_values_unread():
    """transformers reads an attention mask's values to take shortcuts (skip an all-ones mask, find packed
    sequences), which a meta tensor has none of; while tracing it builds the mask without reading them. Meta
    tensors are taken for traced ones here: the mask is then built in full, a few MiB more than the shortcut."""
    from transformers import masking_utils

    tracing = masking_utils.is_tracing
    masking_utils.is_tracing = lambda t: getattr(t, "device", None) == torch.device("meta") or tracing(t)
    try:
        yield
    finally:
        masking_utils.is_tracing = tracing


def training_pass(model, batch: int, length: int, kind: str, checkpointing: bool) -> int:
    """Peak bytes of one forward and backward pass beyond the model's state: the saved activations, and the
    log-probabilities' buffers. ``kind``: ``logprobs`` (SFT, DPO, PPO's actor) or ``scores`` (reward model,
    critic). With activation checkpointing, the layers' inputs are kept and one layer's activations are
    recomputed at a time."""
    from pmrlhf.models.scoring import CHUNK_BYTES, HEAD_ONLY, sequence_scores, token_logprobs

    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    attn = torch.ones_like(ids)
    logits = batch * length * model.config.vocab_size * 4
    if kind == "logprobs":
        # chunked, the logits are recomputed in the backward pass: three chunks of them at its peak (logits,
        # log-softmax, their gradient); unchunked, the saved log-softmax and then its gradient
        run = lambda: token_logprobs(model, ids, attn)  # noqa: E731
        extra = 3 * min(CHUNK_BYTES, logits) if model.config.model_type in HEAD_ONLY else logits
    else:
        run, extra = (lambda: sequence_scores(model, ids, attn)), 0
    model.train()
    saved = saved_for_backward(model, run)
    if not checkpointing:
        return saved + extra  # the backward pass starts at the head, every activation still held
    # the head's buffers come and go before the first layer is recomputed: the peak is the larger of the two
    one_layer = saved // max(1, model.config.num_hidden_layers)
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    inputs = saved_for_backward(model, run)
    getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    return inputs + max(one_layer, extra)


@functools.cache
def _model(name_or_path: str, reward: bool = False):
    """(config, meta model) of a model, built once for every stage and variant that uses it."""
    config = model_config(name_or_path)
    return config, meta_model(config, reward=reward)


@functools.cache
def _pass(model, batch: int, length: int, kind: str, checkpointing: bool) -> int:
    """``training_pass``, once for every stage and variant that makes the same pass: variants differ in their
    objective, not in their memory."""
    return training_pass(model, batch, length, kind, checkpointing)


def state(params: int, launch: Launch, trained: bool, layers: int = 1) -> int:
    """Bytes a model's weights, gradients and optimiser take on one GPU (``layers`` for FSDP's gathered unit)."""
    n = launch.gpus
    if not trained:
        return 2 * params
    if launch.strategy == "zero2":
        return 2 * params + 14 * params // n
    if launch.strategy == "fsdp":
        return 16 * params // n + 2 * 2 * params // max(1, layers)
    return 16 * params


def kv_cache(config, sequences: int, length: int) -> int:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * length * sequences * 2


@dataclass
class StagePlan:
    stage: str
    parts: dict[str, int]  # bytes on one GPU, by what holds them

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def plan_stage(name: str, config, launch: Launch) -> StagePlan:
    """The memory one GPU needs for stage ``name`` of a pipeline (``config`` is its stage config)."""
    from pmrlhf.stages.dpo import DPOConfig
    from pmrlhf.stages.ppo import PPOConfig
    from pmrlhf.stages.reward import RewardConfig
    from pmrlhf.stages.sft import SFTConfig

    # DeepSpeed's bf16 engine holds bf16 weights; elsewhere autocast casts the float32 ones and keeps the casts
    mixed = launch.mixed_precision in ("bf16", "fp16") and launch.strategy != "zero2"
    length = config.data.max_prompt_tokens + config.data.max_response_tokens
    if isinstance(config, PPOConfig):
        return _plan_ppo(name, config, launch, mixed)
    model_cfg = config.model
    reward = isinstance(config, RewardConfig)
    cfg, model = _model(model_cfg.name_or_path, reward)
    p, layers = parameters(model), cfg.num_hidden_layers
    per_gpu = config.optim.batch_size
    parts = {"trained model": state(p, launch, True, layers), "autocast weight copies": 2 * p if mixed else 0}
    if isinstance(config, SFTConfig):
        parts["activations and log-probabilities"] = _pass(
            model, per_gpu, length, "logprobs", model_cfg.gradient_checkpointing
        )
    elif reward:
        parts["activations"] = _pass(model, per_gpu * 2, length, "scores", model_cfg.gradient_checkpointing)
    elif isinstance(config, DPOConfig):
        parts["activations and log-probabilities"] = _pass(
            model, per_gpu * 2, length, "logprobs", model_cfg.gradient_checkpointing
        )
    return StagePlan(name, parts)


def _plan_ppo(name: str, config, launch: Launch, mixed: bool) -> StagePlan:
    (policy_cfg, actor), (reward_cfg, critic) = (
        _model(config.policy.name_or_path),
        _model(config.reward.name_or_path, True),
    )
    if config.prompts_per_iteration % launch.gpus:  # as the stage refuses it (PPOTrainer)
        raise InputError(
            f"{name}: prompts_per_iteration={config.prompts_per_iteration} is not a multiple of {launch.gpus} GPUs, "
            "a launch the stage refuses: change one of them"
        )
    pa, pc = parameters(actor), parameters(critic)
    gae = config.advantage == "gae"
    length = config.data.max_prompt_tokens + config.max_new_tokens
    sequences = config.prompts_per_iteration // launch.gpus * config.samples_per_prompt
    parts = {
        "actor": state(pa, launch, True, policy_cfg.num_hidden_layers),
        "critic": state(pc, launch, True, reward_cfg.num_hidden_layers) if gae else 0,
        "reference": 0 if config.policy.lora_r else 2 * pa,
        "reward model": 0 if gae and config.reward.lora_r else 2 * pc,
        "EMA": 4 * pa if config.ema_decay else 0,
        "autocast weight copies": 2 * pa if mixed else 0,
    }
    batch = config.optim.batch_size
    passes = {
        "sampling (KV cache)": kv_cache(policy_cfg, min(sequences, SAMPLING_BATCH), length),
        "actor update": _pass(actor, batch, length, "logprobs", config.policy.gradient_checkpointing),
        "critic update": (_pass(critic, batch, length, "scores", config.reward.gradient_checkpointing) if gae else 0),
    }
    largest = max(passes, key=passes.get)
    parts[f"largest pass: {largest}"] = passes[largest]
    return StagePlan(name, parts)


def plan_pipeline(pipeline, launch: Launch) -> list[StagePlan]:
    """Every training stage of a pipeline config, in order; PPO and DPO variants that need the same memory
    appear once, under the first variant's name."""
    plans, seen = [], set()
    for name, config in pipeline.stage_configs().items():
        if name in ("eval", "probe"):
            continue
        # a stage that starts from an earlier stage's model has the pipeline's architecture
        for role, source in (
            ("model", pipeline.policy),
            ("policy", pipeline.policy),
            ("reward", pipeline.reward_model),
        ):
            model = getattr(config, role, None)
            if isinstance(model, ModelConfig) and not model.name_or_path:
                setattr(config, role, dataclasses.replace(model, name_or_path=source.name_or_path))
        result = plan_stage(name, config, launch)
        key = tuple(result.parts.items())
        if key not in seen:
            seen.add(key)
            plans.append(result)
    return plans


def table(plans: list[StagePlan], launch: Launch, gpu_memory: float) -> str:
    """A markdown table: per stage, each part and the total per GPU in GiB, and whether it fits."""
    lines = [
        f"Per GPU, {launch.gpus} × {gpu_memory:g} GiB, {launch.strategy}, mixed precision {launch.mixed_precision}:",
        "",
        "| stage | total GiB | fits | what takes it (GiB) |",
        "|---|---|---|---|",
    ]
    for p in plans:
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in p.parts.items() if v)
        lines.append(
            f"| {p.stage} | {p.total / GIB:.1f} | {'yes' if p.total <= gpu_memory * GIB else 'no'} | {parts} |"
        )
    return "\n".join(lines)
