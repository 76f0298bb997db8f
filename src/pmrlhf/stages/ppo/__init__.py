"""Stage 3: PPO with pluggable penalties — standard KL RLHF, PM RLHF and conditional PM RLHF.

Roles: the actor and the frozen reference start from the SFT model, the frozen reward model from stage 2,
the critic from the reward model (InstructGPT, DeepSpeed-Chat). Built on ``accelerate``: one CPU, several
processes (DDP), FSDP or DeepSpeed all run this same loop.

One iteration (``PPOTrainer.step``), in the order of the algorithm:

1. take the next prompts (each process its share);
2. generate one or more responses per prompt (top-p, temperature);
3. score: actor and reference log-probabilities, critic values, reward-model scores;
4. shape per-token rewards: ``-coef * penalty_t`` plus ``clip(r_theta) / beta`` on the last token;
5. advantages: GAE with the critic, or RLOO / group-mean baselines without one;
6. PPO epochs over minibatches: clipped policy loss (+ a KL estimator in the loss, + PPO-ptx), clipped value
   loss;
7. EMA, adaptive KL coefficient, log, checkpoint.

The paper's flags map one to one onto the ``penalty`` section (``config.PPOConfig.canonical_keys``): ``penalty``
(``kl``, or ``entropy`` for (conditional) PM as its code names it), ``kl_ctl`` / ``ent_ctl`` (the coefficient),
``alpha_ctl`` (alpha), and ``clip_reward_value`` (the clip of ``r_theta``); with ``beta: 1`` the reward is its
code's ``clip(r_theta) - kl_ctl * penalty``. Sec. 6's form, ``r_theta / beta`` with coefficient 1, has the same
optimum (``rl.shape_rewards``).

Modules: ``config`` (the settings), ``rollout`` (prompts and trajectories), ``trainer`` (the loop).
"""

from pmrlhf.stages.ppo.config import AdaptiveKLConfig, PenaltyConfig, PPOConfig, penalty_section
from pmrlhf.stages.ppo.trainer import PPOTrainer, run

__all__ = ["AdaptiveKLConfig", "PPOConfig", "PPOTrainer", "PenaltyConfig", "penalty_section", "run"]
