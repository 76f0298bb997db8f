"""The PPO stage's config: every setting of ``pmrlhf ppo``, how the paper's flags resolve to a penalty, and the
combinations refused because they optimise no stated objective (``docs/ppo.md``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pmrlhf.config import DataConfig, LoggingConfig, ModelConfig, require
from pmrlhf.data.world import WorldConfig
from pmrlhf.objectives import rl
from pmrlhf.objectives.penalties import get_penalty


@dataclass
class PPOConfig:
    """Stage 3 (``pmrlhf ppo``). Defaults: the paper's PPO settings (Sec. 6, its reference code)."""

    run_dir: str = "runs/demo"  # the run folder every stage of a pipeline shares
    name: str = "ppo"  # sub-folder of this stage's outputs, e.g. ppo-kl, ppo-cpm-0.3
    seed: int = 0  # seed of sampling, shuffling and initialisation
    world: WorldConfig = field(default_factory=WorldConfig)  # used when data.source is "world"
    data: DataConfig = field(default_factory=lambda: DataConfig(portion="rl", max_response_tokens=16))
    policy: ModelConfig = field(default_factory=ModelConfig)  # actor and reference; "" = <run_dir>/sft/model
    reward: ModelConfig = field(default_factory=ModelConfig)  # reward model and critic; "" = <run_dir>/reward/model
    # --- the objective ---
    penalty: str = "kl"  # kl | pm | cpm_token | cpm_sequence | maxent | entropy (the paper's name for (C)PM)
    kl_ctl: float = 0.1  # coefficient of the penalty when penalty is kl
    ent_ctl: float = 1.0  # coefficient of the penalty for pm / cpm / maxent / entropy
    alpha_ctl: float = 0.3  # alpha of conditional PM; with penalty "entropy", 0 means unconditional PM
    kl_estimator: str = "k1"  # k1 | k2 | k3, for penalty kl (k1 in the reward; k2, k3 only with kl_placement loss)
    # where the kl penalty goes: "reward" (k1 per token, eq. (2.3)) or "loss" (k2 of the whole response, the
    # same objective; k3, the forward KL(pi_ref || pi)), differentiated as in GRPO but per response
    kl_placement: str = "reward"
    maxent_tau: float = 1.0  # tau of the maxent penalty
    beta: float = 1.0  # the reward is clip(r_theta) / beta (Sec. 6's form; 1 gives the reference code's)
    clip_reward_value: float = 5.0  # the reward model's score r_theta is clipped to +-this (before / beta)
    normalize_reward: bool = False  # standardise scores with running mean and std before scaling
    target_kl: float = 0.0  # adaptive KL coefficient (Ziegler et al.) towards this sequence KL; 0 keeps it fixed
    # --- advantages ---
    advantage: str = "gae"  # gae (critic) | rloo | group_mean (critic-free)
    samples_per_prompt: int = 1  # responses per prompt (>= 2 for rloo / group_mean)
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # normalise advantages over the batch
    # --- optimisation ---
    iterations: int = 100  # PPO iterations (generate + train)
    prompts_per_iteration: int = 16  # prompts per iteration, over all processes
    ppo_epochs: int = 1  # passes over each batch of trajectories
    minibatch_size: int = 16  # sequences per gradient step on each process
    actor_lr: float = 1e-4  # actor learning rate
    critic_lr: float = 5e-4  # critic learning rate
    warmup_iterations: int = 0  # linear warm-up of both learning rates
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    clip: float = 0.2  # PPO ratio clip
    value_clip: float = 0.2  # value clip
    vf_coef: float = 1.0  # weight of the value loss
    ptx_coef: float = 0.0  # PPO-ptx: weight of the SFT log-likelihood term; 0 disables
    ema_decay: float = 0.0  # EMA of the actor's weights (saved as model-ema); 0 disables
    # --- generation ---
    max_new_tokens: int = 16  # generation limit
    top_p: float = 0.9  # nucleus sampling
    temperature: float = 1.0  # sampling temperature
    # torch.compile the decoding step over a static KV cache: a one-time compile (seconds on CPU) for faster
    # sampling; for long runs, not with sharded parameters
    compile_sampler: bool = False
    # --- running ---
    checkpoint_every: int = 25  # iterations between checkpoints; 0 only at the end
    keep_checkpoints: int = 2  # how many checkpoints to keep
    resume: bool = False  # continue from the last checkpoint in <run_dir>/<name>/checkpoints
    # no | bf16 | fp16; None: the half type policy.dtype names, else what `accelerate launch` was configured
    # with (no outside it). With mixed precision the actor and critic keep float32 weights and compute under
    # autocast, and the frozen reference and reward model are held in the half type.
    mixed_precision: str | None = None
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(log_every=1))

    def resolved_penalty(self) -> tuple[str, float, dict]:
        """(registry name, coefficient, keyword arguments) of the penalty this config asks for."""
        if self.penalty == "kl":
            return "kl", self.kl_ctl, {}
        if self.penalty == "entropy":  # the reference code's switch: PM, conditional on alpha_ctl > 0
            return (
                ("cpm_token", self.ent_ctl, {"alpha": self.alpha_ctl})
                if self.alpha_ctl > 0
                else ("pm", self.ent_ctl, {})
            )
        if self.penalty in ("cpm_token", "cpm_sequence", "cpm"):
            return self.penalty, self.ent_ctl, {"alpha": self.alpha_ctl}
        if self.penalty == "maxent":
            return "maxent", self.ent_ctl, {"tau": self.maxent_tau}
        return self.penalty, self.ent_ctl, {}

    def kl_in_loss(self) -> str | None:
        """The KL estimator that goes into the loss instead of the reward, or None."""
        return self.kl_estimator if self.penalty == "kl" and self.kl_placement == "loss" else None

    def validate(self) -> None:
        get_penalty(self.resolved_penalty()[0])
        if self.kl_placement not in ("reward", "loss"):
            raise ValueError(f"unknown kl_placement {self.kl_placement!r}; use reward or loss")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"unknown kl_estimator {self.kl_estimator!r}; use k1, k2 or k3")
        if self.penalty == "kl" and self.kl_placement == "reward" and self.kl_estimator != "k1":
            raise ValueError(
                f"kl_estimator {self.kl_estimator} as a reward is not a KL penalty (a reward -coef * k3 follows "
                "E r - coef KL(pi || pi_ref) + coef KL(pi_ref || pi); k2 collapses onto one answer): use k1, or "
                "set kl_placement: loss, where k2 gives the gradient of KL(pi || pi_ref) and k3 of KL(pi_ref || pi)"
            )
        if self.penalty == "kl" and self.kl_placement == "loss" and self.kl_estimator == "k1":
            raise ValueError(
                "kl_estimator k1 in the loss has zero expected gradient: use k2 or k3 there, or k1 as a reward"
            )
        if self.kl_placement == "loss" and self.penalty != "kl":
            raise ValueError(f"kl_placement: loss is for penalty kl, not {self.penalty!r}")

        if self.advantage not in ("gae", *rl.SEQUENCE_ADVANTAGES):
            raise ValueError(f"unknown advantage {self.advantage!r}; use gae, {', '.join(rl.SEQUENCE_ADVANTAGES)}")
        if self.advantage != "gae" and self.samples_per_prompt < 2:
            raise ValueError(f"advantage={self.advantage} needs samples_per_prompt >= 2")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise ValueError(f"unknown mixed_precision {self.mixed_precision!r}; use no, bf16 or fp16")
        if self.beta <= 0 or self.max_new_tokens < 1 or self.iterations < 1:
            raise ValueError("need beta > 0, max_new_tokens >= 1 and iterations >= 1")
        for name in ("prompts_per_iteration", "minibatch_size", "samples_per_prompt", "ppo_epochs"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(
            0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 samples from the whole distribution), got {self.top_p}"
        )
        require(
            self.temperature > 0,
            f"temperature must be > 0, got {self.temperature}: PPO needs sampling from a distribution, not greedy "
            "decoding",
        )
        if self.resolved_penalty()[0].startswith("cpm") or (self.penalty == "entropy" and self.alpha_ctl != 0):
            require(0 < self.alpha_ctl <= 1, f"alpha_ctl must be in (0, 1], got {self.alpha_ctl}")
        require(self.clip_reward_value > 0, f"clip_reward_value must be > 0, got {self.clip_reward_value}")
