"""The four roles (policy, reference, reward model, critic): built from config, loaded, saved, scored.

Everything saved here loads back with plain ``transformers`` (``AutoModelForCausalLM``,
``AutoModelForSequenceClassification``); a LoRA model is merged before it is saved."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from pmrlhf.config import InputError, ModelConfig, read_json
from pmrlhf.data.sources import offline_unless_hub_answers
from pmrlhf.io import atomic_dir
from pmrlhf.models.fetch import resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


TINY_ARCHS = ("gpt2", "llama", "opt", "qwen2", "gpt_neox")  # the recipes' families, and the next ones users try


def tiny_config(
    arch: str,
    vocab_size: int,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    max_positions: int = 128,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
):
    """A small transformer config of a real architecture (no download), with what sets each family apart: GPT-2
    (learned positions, tied embeddings), Llama and Qwen2 (RoPE, grouped-query attention with half as many
    key-value heads, RMSNorm, untied; Qwen2 with biases on q, k, v), OPT (learned positions offset by 2, a final
    layer norm, ReLU), GPT-NeoX / Pythia (parallel attention and MLP, partial rotary, untied). No dropout, so
    that a seeded run repeats. ``bos_token_id`` defaults to the end-of-sequence token, as in GPT-2 and OPT."""
    from transformers import AutoConfig

    bos = eos_token_id if bos_token_id is None else bos_token_id
    shared = dict(vocab_size=vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=bos)
    sizes = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
    )
    grouped = dict(num_key_value_heads=max(1, heads // 2), tie_word_embeddings=False)
    settings = {
        "gpt2": dict(
            n_positions=max_positions,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
        "llama": sizes | grouped,
        "qwen2": sizes | grouped,
        "opt": {k: v for k, v in sizes.items() if k != "intermediate_size"}
        | dict(
            ffn_dim=hidden * 4,
            word_embed_proj_dim=hidden,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            layerdrop=0.0,
        ),
        "gpt_neox": sizes
        | dict(
            rotary_pct=0.25,
            use_parallel_residual=True,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            tie_word_embeddings=False,
        ),
    }
    if arch not in settings:
        raise ValueError(f"unknown tiny architecture {arch!r}; use one of {', '.join(TINY_ARCHS)}")
    return AutoConfig.for_model(arch, **settings[arch], **shared)


def _tiny_from(cfg: ModelConfig, tokenizer):
    return tiny_config(
        cfg.tiny_arch,
        len(tokenizer),
        cfg.tiny_layers,
        cfg.tiny_hidden,
        cfg.tiny_heads,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def context_length(cfg: ModelConfig, tokenizer, path: str | Path | None = None) -> int | None:
    """How many positions the model that ``load_causal_lm`` would load has, read from its config alone (no
    weights are loaded); None where the config does not say."""
    from transformers import AutoConfig

    source = resolve(str(path or cfg.name_or_path))
    config = (
        _loaded(source, "a model", AutoConfig.from_pretrained, trust_remote_code=cfg.trust_remote_code)
        if source
        else _tiny_from(cfg, tokenizer)
    )
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


# batch x length^2 of a pass above which PyTorch's SDPA CPU kernels beat eager attention (``attention_for_passes``)
EAGER_LIMIT = 1_500_000


def attention_implementation(cfg: ModelConfig) -> str | None:
    """The ``attn_implementation`` to load with (None: transformers' default): eager on a CPU, for the short passes
    of most stages (``attention_for_passes`` settles it for a stage whose passes are long)."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return None if torch.cuda.is_available() else "eager"


def attention_for_passes(cfg: ModelConfig, batch: int, length: int) -> ModelConfig:
    """``cfg`` with ``auto`` attention settled for a stage whose largest pass is ``batch`` sequences of ``length``
    tokens: on a CPU, SDPA beyond ``EAGER_LIMIT``, where its kernels overtake eager attention
    (``benchmarks/scaling.py`` measures both; ``docs/ppo.md``)."""
    if cfg.attn_implementation != "auto" or torch.cuda.is_available() or batch * length**2 <= EAGER_LIMIT:
        return cfg
    return dataclasses.replace(cfg, attn_implementation="sdpa")


def fuse_activations(model):
    """Run GPT-2's ``gelu_new`` (five elementwise kernels) as PyTorch's tanh GELU: the same function in one
    kernel, forward and backward. The config is untouched, so the model saves as it was."""
    from transformers.activations import NewGELUActivation, PytorchGELUTanh

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, PytorchGELUTanh())
    return model


def train_without_dropout(model):
    """Put a model in training mode with every dropout at zero, and return it: what ``load_causal_lm`` and
    ``load_reward_model`` do to a model loaded to be trained (the reward model, DPO's policy, PPO's actor and
    critic, SFT's model).

    transformers runs activation checkpointing only in training mode, and ``from_pretrained`` returns a model in
    evaluation mode: left there, ``gradient_checkpointing: true`` silently kept every activation. Dropout stays
    off, as it always was in these stages (and as TRL's PPO and DPO trainers set it): PPO's ratio against the
    sampling policy and DPO's against the reference assume one deterministic function. Dropout is zeroed where
    the layers read it at each forward pass (``nn.Dropout`` modules and the float ``*dropout*`` attributes that
    OPT, Llama and Qwen2 layers keep); the config is untouched, so the model saves as it was."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    return model.train()


def _finish(model, cfg: ModelConfig, task_type: str):
    if cfg.gradient_checkpointing:  # transformers 5 renamed it; older releases only have the first name
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.config.use_cache = False
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            task_type=task_type,
            modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
        )
        model = get_peft_model(model, lora)
    return train_without_dropout(model)


def _fit_vocabulary(model, tokenizer, source: str, role: str) -> None:
    """Refuse to read ``tokenizer``'s ids with a ``model`` (from ``source``) that means other tokens by them: one
    with fewer embeddings than the tokenizer has words (made up at random), or one trained with another tokenizer
    (a reward model would score other words). Special tokens a tokenizer adds past the model's embeddings (Qwen2's
    ``<|endoftext|>``) get rows. Set the tokenizer's pad token."""
    own = str(getattr(tokenizer, "name_or_path", "") or "")
    if source and own and Path(own) != Path(source):
        theirs, ours = _vocabulary(source), tokenizer.get_vocab()
        if theirs is not None and theirs != ours:
            differ = sum(theirs.get(token) != i for token, i in ours.items()) + len(theirs.keys() - ours.keys())
            raise InputError(
                f"{source} ({role}) was trained with another tokenizer than {own}: {differ} tokens have other ids "
                f"or none there, and token ids pass from one to the other, so it would read other words. Use {role} "
                f"trained with {own}'s tokenizer"
            )
    rows = model.get_input_embeddings().num_embeddings
    special = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    if not set(range(rows, len(tokenizer))) <= special:
        raise InputError(
            f"{source or 'the model'} ({role}) embeds {rows} tokens, but the tokenizer it is read with has "
            f"{len(tokenizer)}: tokens past {rows - 1} would get random embeddings. Use the model's own tokenizer"
        )
    if rows < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id


def _vocabulary(source: str) -> dict[str, int] | None:
    """The token ids of the tokenizer saved with the model at ``source``; None where it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source).get_vocab()
    except Exception:  # no tokenizer files beside the model, nothing to compare
        return None


def load_causal_lm(cfg: ModelConfig, tokenizer, path: str | Path | None = None, trainable: bool = True):
    """The policy or the reference: from ``path``, ``cfg.name_or_path``, or a tiny model built from config."""
    from transformers import AutoModelForCausalLM

    source = resolve(str(path or cfg.name_or_path))
    kw = dict(dtype=DTYPES[cfg.dtype], attn_implementation=attention_implementation(cfg))
    if source:
        model, info = _loaded(
            source,
            "a language model",
            AutoModelForCausalLM.from_pretrained,
            trust_remote_code=cfg.trust_remote_code,
            output_loading_info=True,
            **kw,
        )
        _check_loaded(source, info, "a language model", refuse_unexpected="score")
    else:
        model = AutoModelForCausalLM.from_config(_tiny_from(cfg, tokenizer), **kw)
    fuse_activations(model)
    _fit_vocabulary(model, tokenizer, source, "a language model")
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if not trainable:
        model.requires_grad_(False).eval()
        return model
    return _finish(model, cfg, "CAUSAL_LM")


def load_reward_model(cfg: ModelConfig, tokenizer, path: str | Path | None = None, trainable: bool = True, groups=1):
    """A reward model, ``AutoModelForSequenceClassification`` of one label (of ``groups``: a mixture's), built from
    ``path`` or ``cfg.name_or_path`` or as a tiny model from config. A causal LM checkpoint such as the SFT model
    gets a fresh score head to train (the reward stage); a frozen one (``trainable=False``: scoring in PPO and
    evaluation) must have its head, or it would score at random."""
    from transformers import AutoModelForSequenceClassification

    source = resolve(str(path or cfg.name_or_path))
    kw = dict(dtype=DTYPES[cfg.dtype], attn_implementation=attention_implementation(cfg))
    saved = Path(source or "-") / "config.json"
    held = read_json(saved, f"remove {saved}") if saved.is_file() else {}
    labels = len(held.get("id2label", (0, 1)))  # transformers writes none for its default, two labels
    if groups == 1 and "Classification" in str(held.get("architectures")) and labels > 1:
        raise InputError(f"{source} gives {labels} scores (a mixture of labeler groups?), not the one reward needed")
    if source:
        model, info = _loaded(
            source,
            "a reward model",
            AutoModelForSequenceClassification.from_pretrained,
            num_labels=groups,
            trust_remote_code=cfg.trust_remote_code,
            output_loading_info=True,
            **kw,
        )
        _check_loaded(source, info, "a reward model", allow_missing="score" if trainable else None)
    else:
        c = _tiny_from(cfg, tokenizer)
        c.num_labels = groups
        model = AutoModelForSequenceClassification.from_config(c, **kw)
    fuse_activations(model)
    _fit_vocabulary(model, tokenizer, source, "a reward model")
    if not trainable:
        model.requires_grad_(False).eval()
        return model
    return _finish(model, cfg, "SEQ_CLS")


def _loaded(source: str, role: str, load, **kw):
    """``load(source, **kw)``, its many ways of failing (no folder, an empty or corrupt one, no network) said in
    one line that names the folder or name."""
    if not Path(source).exists():
        offline_unless_hub_answers()
    try:
        return load(source, **kw)
    except Exception as e:  # OSError, ValueError, JSON and safetensors errors, Hub errors: one message
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "the folder" if Path(source).exists() else "no such folder, and the Hugging Face Hub"
        raise InputError(f"{source} cannot be loaded as {role} ({where} said: {reason})") from None


def _check_loaded(
    source: str, info: dict, role: str, allow_missing: str | None = None, refuse_unexpected: str | None = None
) -> None:
    """Refuse a checkpoint that lacks weights the model needs (transformers would initialise them at random and
    say so only in a log line) or that holds a head of another kind, naming the folder and what it holds."""
    missing = sorted(k for k in info["missing_keys"] if not (allow_missing and k.startswith(allow_missing)))
    unexpected = sorted(k for k in info["unexpected_keys"] if refuse_unexpected and k.startswith(refuse_unexpected))
    if unexpected:
        raise InputError(
            f"{source} holds a reward model ({', '.join(unexpected)}), not {role}"
            + (f"; it lacks {', '.join(missing[:5])}, which would be random" if missing else "")
        )
    if missing:
        hint = (
            " (it holds a language model without a reward head)" if any(k.startswith("score") for k in missing) else ""
        )
        raise InputError(
            f"{source} cannot be loaded as {role}{hint}: it lacks {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}, which would be random"
        )


class Critic(nn.Module):
    """A per-token value model: a sequence-classification model whose score head is applied at every position,
    initialised from the reward model by default (InstructGPT, DeepSpeed-Chat), so it saves and loads as an
    ordinary ``AutoModelForSequenceClassification``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Values ``[B, T]``: the score head on every position's last hidden state."""
        backbone = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = backbone.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return backbone.score(hidden).squeeze(-1).float()


class WithoutAdapter:
    """A frozen model that is a trained model's base: the LoRA-adapted ``model`` called with its adapter switched
    off (TRL's way of holding PPO's and DPO's reference). No second copy of the weights is held: only the base
    the adapter sits on, which training leaves as it was. Calls run without gradients."""

    def __init__(self, model):
        if not hasattr(model, "disable_adapter"):
            raise ValueError("WithoutAdapter needs a model with a LoRA adapter (lora_r > 0)")
        self.model = model

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def get_base_model(self):  # what scoring looks inside for the architecture
        return self.model.get_base_model()

    def parameters(self):
        return self.model.parameters()

    def to(self, device):  # it moves with the model it is the base of
        return self


def unwrap_for_saving(model, keep: bool = False):
    """The plain ``transformers`` model to save: LoRA merged, wrappers removed. Merging replaces the LoRA layers in
    place; with ``keep`` it is done on a copy, and ``model`` stays as it was for later use."""
    if isinstance(model, Critic):
        model = model.model
    if hasattr(model, "merge_and_unload"):
        model = (copy.deepcopy(model) if keep else model).merge_and_unload()
    return model


def save_model(model, tokenizer, path: Path, keep: bool = False) -> Path:
    """Save a model and its tokenizer in Hugging Face format, atomically (a crash leaves the old folder). ``keep``:
    the model is used after this (``unwrap_for_saving``)."""
    plain = unwrap_for_saving(model, keep)

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(Path(path), write)


def load_tokenizer(source: str | Path):
    """A tokenizer with a pad token (the end-of-sequence token if the model has none), padding on the left."""
    from transformers import AutoTokenizer

    tok = _loaded(resolve(str(source)), "a tokenizer", AutoTokenizer.from_pretrained)
    if tok.eos_token is None:  # responses end with it, and sampling stops at it
        raise InputError(f"the tokenizer of {source} has no end-of-sequence token: set eos_token in its config")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok
