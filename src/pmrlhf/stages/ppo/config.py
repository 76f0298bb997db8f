"""The PPO stage's config: every setting of ``pmrlhf ppo``, the paper's flags as aliases of its penalty section,
and the combinations refused because they optimise no stated objective (``docs/ppo.md``)."""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass, field

from pmrlhf.config import (
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    one_of,
    require,
    require_learning_rate,
)
from pmrlhf.objectives import rl
from pmrlhf.objectives.penalties import PENALTIES, PenaltyRule, get_penalty
from pmrlhf.stages.base import StageConfig

PAPER_FLAGS = ("kl_ctl", "ent_ctl", "alpha_ctl")  # the reference code's flag names, accepted as aliases

# Settings that moved, and where to: an old config that names one is refused with its new place.
MOVED = {
    "actor_lr": "optim.lr",
    "ppo_epochs": "optim.epochs",
    "minibatch_size": "optim.batch_size",
    "max_grad_norm": "optim.max_grad_norm",
    "warmup_iterations": "optim.warmup_ratio (a share of the iterations)",
    "target_kl": "adaptive_kl.target",
    "kl_estimator": "penalty.kl_estimator",
    "kl_placement": "penalty.placement",
    "maxent_tau": "penalty.tau",
}


@dataclass
class PenaltyConfig:
    """The regulariser of the objective: a penalty of ``objectives.penalties`` and its arguments."""

    # a penalty of objectives.penalties.PENALTIES: kl | pm | cpm_token | cpm_sequence | cpm_mean | cpm_prefix |
    # cpm_running | maxent (the paper's entropy: pm or cpm_token)
    name: str = "kl"
    coef: float | None = None  # its coefficient; None: its own default, 0.1 for kl (the paper's kl_ctl), else 1
    alpha: float = 0.3  # alpha of the conditional rules (the paper's alpha_ctl)
    tau: float = 1.0  # tau of maxent
    options: dict[str, float] = field(default_factory=dict)  # any other hyperparameter of a registered penalty
    kl_estimator: str = "k1"  # for kl: k1 in the reward; k2 or k3 only with placement loss
    # for kl: "reward" (k1 per token, eq. (2.3)) or "loss" (k2 of the whole response, the same objective; k3, the
    # forward KL(pi_ref || pi)), differentiated as in GRPO but per response
    placement: str = "reward"

    def rule(self) -> PenaltyRule:
        try:
            return get_penalty(self.name)
        except ValueError as e:
            raise ConfigError(f"penalty.name: {e}") from None

    def coefficient(self) -> float:
        return self.rule().default_coef if self.coef is None else self.coef

    def kwargs(self) -> dict:
        """The penalty's keyword arguments, each hyperparameter its entry names from this section."""
        return self.rule().kwargs({"alpha": self.alpha, "tau": self.tau, **self.options})

    def is_kl(self) -> bool:
        """Whether this is the KL penalty, the only one with estimators (k1 in the reward, k2 or k3 in the loss)."""
        return self.rule().family == "kl"

    def kl_in_loss(self) -> str | None:
        """The KL estimator that goes into the loss instead of the reward, or None."""
        return self.kl_estimator if self.is_kl() and self.placement == "loss" else None

    def validate(self) -> None:
        rule = self.rule()
        unknown = sorted(set(self.options) - set(rule.hyperparameters))
        require(not unknown, f"penalty.options: {self.name} takes no {', '.join(unknown)}")
        one_of("penalty.placement", self.placement, ("reward", "loss"))
        one_of("penalty.kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        require(self.coefficient() >= 0, f"penalty.coef (kl_ctl / ent_ctl) must be >= 0, got {self.coefficient()}")
        require(self.tau > 0, f"penalty.tau must be > 0, got {self.tau}")
        if self.is_kl() and self.placement == "reward" and self.kl_estimator != "k1":
            raise ConfigError(
                f"kl_estimator {self.kl_estimator} as a reward is not a KL penalty (a reward -coef * k3 follows "
                "E r - coef KL(pi || pi_ref) + coef KL(pi_ref || pi); k2 collapses onto one answer): use k1, or "
                "set placement: loss, where k2 gives the gradient of KL(pi || pi_ref) and k3 of KL(pi_ref || pi)"
            )
        if self.is_kl() and self.placement == "loss" and self.kl_estimator == "k1":
            raise ConfigError(
                "kl_estimator k1 in the loss has zero expected gradient: use k2 or k3 there, or k1 as a reward"
            )
        if self.placement == "loss" and not self.is_kl():
            raise ConfigError(f"placement: loss is for penalty kl, not {self.name!r}")
        if "alpha" in rule.hyperparameters:
            require(0 < self.alpha <= 1, f"penalty.alpha must be in (0, 1], got {self.alpha}")


@dataclass
class AdaptiveKLConfig:
    """Ziegler et al.'s proportional controller of the penalty's coefficient."""

    target: float = 0.0  # the sequence KL the coefficient is moved towards; 0 keeps the coefficient fixed
    horizon: int = 10_000  # responses over which an error of the KL is corrected


def reward_function(spec: str):
    """The function ``spec`` (``module:function``) names, refused in one line where it cannot be imported."""
    module, _, name = spec.partition(":")
    require(bool(module and name), f"reward_function must be module:function, got {spec!r}")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward_function {spec!r} cannot be imported ({e})") from None
    require(callable(function), f"reward_function {spec!r} is not a function")
    return function


def penalty_section(data: dict) -> dict:
    """``data`` with a ``penalty`` given as a name (the paper's ``penalty: kl``) written as its section."""
    penalty = data.get("penalty")
    return {**data, "penalty": {"name": penalty}} if isinstance(penalty, str) else data


@dataclass
class PPOConfig(StageConfig):
    """Stage 3 (``pmrlhf ppo``). Defaults: the paper's PPO settings (Sec. 6, its reference code)."""

    name: str = "ppo"  # sub-folder of this stage's outputs, e.g. ppo-kl, ppo-cpm-0.3
    data: DataConfig = field(default_factory=lambda: DataConfig(max_response_tokens=16))  # the prompts
    checkpoint_every: int = 25  # iterations between checkpoints; 0 only at the end
    # a line per iteration, a table of what the policy wrote every 25
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(log_every=1, samples_every=25))
    policy: ModelConfig = field(default_factory=ModelConfig)  # actor and reference; "" = <run_dir>/sft/model
    reward: ModelConfig = field(default_factory=ModelConfig)  # reward model and critic; "" = <run_dir>/reward/model
    # module:function(prompts, completions) -> rewards (TRL's reward functions), scoring in place of the reward model
    reward_function: str = ""
    # --- the objective ---
    penalty: PenaltyConfig = field(default_factory=PenaltyConfig)  # the regulariser: name, coef, alpha, ...
    beta: float = 1.0  # the reward is clip(r_theta) / beta (Sec. 6's form; 1 gives the reference code's)
    clip_reward_value: float = 5.0  # the reward model's score r_theta is clipped to +-this (before / beta)
    normalize_reward: bool = False  # standardise scores with running mean and std before scaling
    adaptive_kl: AdaptiveKLConfig = field(default_factory=AdaptiveKLConfig)  # moves the coefficient; off by default
    # --- advantages ---
    advantage: str = "gae"  # gae (critic) | rloo | group_mean (critic-free)
    samples_per_prompt: int = 1  # responses per prompt (>= 2 for rloo / group_mean)
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # normalise advantages over the batch
    # what the policy loss's token sum is divided by: constant (responses x max_new_tokens: the expected update is
    # the objective's gradient) | token_mean (the minibatch's token count, as the paper's code: biased when
    # response lengths vary)
    loss_normalization: str = "constant"
    # --- optimisation ---
    iterations: int = 100  # PPO iterations (generate + train)
    prompts_per_iteration: int = 16  # prompts per iteration, over all processes
    # the actor's optimiser: epochs are passes over each iteration's trajectories, batch_size the sequences of a
    # gradient step on each process; the schedule runs over the iterations
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, epochs=1, batch_size=16))
    critic_lr: float = 5e-4  # the critic's learning rate (the rest of its optimiser is the actor's)
    clip: float = 0.2  # PPO ratio clip
    value_clip: float = 0.2  # value clip
    vf_coef: float = 1.0  # weight of the value loss
    ptx_coef: float = 0.0  # PPO-ptx: weight of the SFT log-likelihood term; 0 disables
    ema_decay: float = 0.0  # EMA of the actor's weights (saved as model-ema); 0 disables
    # --- generation ---
    max_new_tokens: int = 16  # generation limit
    # nucleus sampling; below 1 the samples come from a truncated policy while the loss assumes the whole one, so
    # it is refused for the PM family and warned about for kl (the paper's code used 0.9)
    top_p: float = 1.0
    temperature: float = 1.0  # sampling temperature; other than 1, as top_p below 1
    # torch.compile the decoding step over a static KV cache: a one-time compile (seconds on CPU) for faster
    # sampling; for long runs, not with sharded parameters
    compile_sampler: bool = False
    # no | bf16 | fp16; None: the half type policy.dtype names, else what `accelerate launch` was configured
    # with (no outside it). With mixed precision the actor and critic keep float32 weights and compute under
    # autocast, and the frozen reference and reward model are held in the half type.
    mixed_precision: str | None = None

    @classmethod
    def canonical_keys(cls, data: dict) -> dict:
        """``data`` with the paper's flags as this config's keys, one to one: ``penalty: kl`` (a name) is
        ``penalty.name``, and ``entropy`` is ``cpm_token``, or ``pm`` where ``alpha_ctl`` is 0 (its code's switch);
        ``kl_ctl`` is ``penalty.coef`` where the penalty is kl and ``ent_ctl`` where it is not (the other is
        unused, as there); ``alpha_ctl`` is ``penalty.alpha``. A setting that moved is refused with its place."""
        moved = [f"{k} is now {MOVED[k]}" for k in data if k in MOVED]
        if moved:
            raise ConfigError(f"{'; '.join(moved)} (docs/ppo.md)")
        data = penalty_section(data)
        penalty = dict(data.get("penalty") or {})
        flags = {k: data[k] for k in PAPER_FLAGS if k in data}
        data = {k: v for k, v in data.items() if k not in PAPER_FLAGS}
        if "alpha_ctl" in flags:
            _set_once(penalty, "alpha", flags["alpha_ctl"], "alpha_ctl")
        if penalty.get("name") == "entropy":
            alpha = float(penalty.get("alpha", PenaltyConfig.alpha))
            penalty["name"] = "cpm_token" if alpha > 0 else "pm"
        rule = PENALTIES.get(penalty.get("name", PenaltyConfig.name))  # an unknown name is refused with the others
        flag = "kl_ctl" if rule is not None and rule.family == "kl" else "ent_ctl"
        if flag in flags:
            _set_once(penalty, "coef", flags[flag], flag)
        return {**data, "penalty": penalty} if penalty else data

    def role_models(self, longest_prompt: int, processes: int, mixed_precision: str) -> tuple[ModelConfig, ...]:
        """Loading options of (actor, reference, critic, reward model): the attention that the stage's largest pass
        calls for (``models.attention_for_passes``: its training or sampling batch, at the longest prompt plus
        ``max_new_tokens``), and each role's precision under ``mixed_precision`` (``setup.load_precisions``)."""
        from pmrlhf.models import attention_for_passes
        from pmrlhf.training.setup import load_precisions

        length = longest_prompt + self.max_new_tokens
        batch = max(self.optim.batch_size, self.prompts_per_iteration * self.samples_per_prompt // processes)
        (actor, reference), (critic, reward) = (
            load_precisions(attention_for_passes(m, batch, length), mixed_precision) for m in (self.policy, self.reward)
        )
        return actor, reference, critic, reward

    def processed_sampling_message(self) -> str:
        return (
            f"top_p {self.top_p} and temperature {self.temperature} sample from another distribution than the "
            f"policy whose log-probabilities the loss takes, so penalty {self.penalty.name} no longer optimises "
            "its stated objective (a PM objective matches the whole distribution); policy/ratio shows the mismatch"
        )

    def validate(self) -> None:
        self.penalty.validate()
        if self.reward_function:
            reward_function(self.reward_function)  # refused here, not after the models are loaded
        require_learning_rate("critic_lr", self.critic_lr)
        one_of("advantage", self.advantage, ("gae", *rl.SEQUENCE_ADVANTAGES))
        require(
            self.advantage == "gae" or self.samples_per_prompt >= 2, f"{self.advantage} needs samples_per_prompt >= 2"
        )
        one_of("mixed_precision", self.mixed_precision, (None, "no", "bf16", "fp16"))
        require(self.beta > 0, f"beta must be > 0, got {self.beta}")
        for name in ("gamma", "lam"):
            require(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("clip", "value_clip"):
            require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name, value in (
            ("vf_coef", self.vf_coef),
            ("ptx_coef", self.ptx_coef),
            ("adaptive_kl.target", self.adaptive_kl.target),
        ):
            require(value >= 0, f"{name} must be >= 0, got {value}")
        require(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1) (0 disables), got {self.ema_decay}")
        for name in ("iterations", "max_new_tokens", "prompts_per_iteration", "samples_per_prompt"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(
            self.optim.epochs == int(self.optim.epochs),
            f"optim.epochs must be a whole number of passes over each iteration's samples, got {self.optim.epochs}",
        )
        require(self.optim.grad_accum == 1, "PPO takes no gradient accumulation: set optim.grad_accum to 1")
        require(self.adaptive_kl.horizon >= 1, f"adaptive_kl.horizon must be >= 1, got {self.adaptive_kl.horizon}")
        require(
            0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 samples from the whole distribution), got {self.top_p}"
        )
        require(
            self.temperature > 0,
            f"temperature must be > 0, got {self.temperature}: PPO needs sampling from a distribution, not greedy "
            "decoding",
        )
        one_of("loss_normalization", self.loss_normalization, rl.LOSS_NORMALIZATIONS)
        if self.top_p < 1 or self.temperature != 1:
            require(self.penalty.is_kl(), self.processed_sampling_message() + ": set top_p: 1 and temperature: 1")
            warnings.warn(self.processed_sampling_message(), stacklevel=2)
        require(self.clip_reward_value > 0, f"clip_reward_value must be > 0, got {self.clip_reward_value}")


def _set_once(section: dict, key: str, value, flag: str) -> None:
    if key in section:
        raise ConfigError(f"{flag} and penalty.{key} are the same setting: give one of them")
    section[key] = value


def objective(config: PPOConfig, coef: float, moments) -> dict:
    """What a run of ``config`` optimised, for ``pmrlhf eval`` to find its optimum: the penalty and its arguments,
    the coefficient as it ended (``coef``: the adaptive controller moves it) and as it started, and how the score
    was turned into the reward (beta, clip, and the standardisation ``moments`` ended with, which sets the
    optimum's temperature too)."""
    c, p = config, config.penalty
    return {
        "method": "ppo",
        "penalty": p.name,
        "coef": coef,
        "initial_coef": p.coefficient(),
        "adaptive_coef": c.adaptive_kl.target > 0,
        **p.kwargs(),  # each hyperparameter under its name, as evaluation.exact.penalty_kwargs reads it back
        "kl_estimator": p.kl_estimator if p.is_kl() else None,
        "kl_placement": p.placement if p.is_kl() else None,
        "advantage": c.advantage,
        "beta": c.beta,
        "clip_reward_value": c.clip_reward_value,
        "reward_normalization": (
            {"mean": moments.mean, "std": math.sqrt(moments.var + 1e-8)} if c.normalize_reward else None
        ),
    }
