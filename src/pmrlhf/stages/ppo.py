"""Stage 3: PPO with pluggable penalties — standard KL RLHF, PM RLHF and conditional PM RLHF.

Roles: the actor and the frozen reference start from the SFT model, the frozen reward model from stage 2,
the critic from the reward model (InstructGPT, DeepSpeed-Chat). Built on ``accelerate``: one CPU, several
processes (DDP), FSDP or DeepSpeed all run this same loop.

One iteration, in the order of the algorithm:

1. take the next prompts (each process its share);
2. generate one or more responses per prompt (top-p, temperature);
3. score: actor and reference log-probabilities, critic values, reward-model scores;
4. shape per-token rewards: ``-coef * penalty_t`` plus ``clip(r_theta) / beta`` on the last token;
5. advantages: GAE with the critic, or RLOO / group-mean baselines without one;
6. PPO epochs over minibatches: clipped policy loss (+ a KL estimator in the loss, + PPO-ptx), clipped value
   loss;
7. EMA, adaptive KL coefficient, log, checkpoint.

The paper's flags map one to one: ``penalty`` (``kl``, or ``entropy`` for (conditional) PM as its code
names it), ``kl_ctl`` / ``ent_ctl`` (the coefficient), ``alpha_ctl`` (alpha), ``clip_reward_value`` (the clip
of ``r_theta``); with ``beta: 1`` the reward is its code's ``clip(r_theta) - kl_ctl * penalty``. Sec. 6's form,
``r_theta / beta`` with coefficient 1, has the same optimum (``rl.shape_rewards``).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path

import torch

from pmrlhf.config import DataConfig, to_dict
from pmrlhf.io import MetricsLog, atomic_write_json, atomic_write_text
from pmrlhf.models import Critic, load_causal_lm, load_reward_model, load_tokenizer, save_model
from pmrlhf.models.scoring import join, token_logprobs
from pmrlhf.objectives import rl
from pmrlhf.objectives.penalties import get_penalty
from pmrlhf.stages import checkpoints
from pmrlhf.stages.common import (
    adamw,
    console,
    gathered_model,
    load_precisions,
    optimizer_step,
    parameters_sharded,
    seed_everything,
    stage_accelerator,
)
from pmrlhf.stages.guards import check_finite
from pmrlhf.stages.ppo_config import PPOConfig
from pmrlhf.stages.rollout import CompiledDecoding, Trajectory, critic_values, generate, score
from pmrlhf.stages.run_folder import (
    finish_stage,
    load_stage_records,
    require_examples,
    stage_dir,
    stage_encoder,
    world_dir,
)


class RunningMoments:
    """Running mean and variance of reward-model scores (Chan et al.'s parallel update)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def update(self, x: torch.Tensor) -> None:
        n, m, v = x.numel(), x.mean().item(), x.var(unbiased=False).item() if x.numel() > 1 else 0.0
        delta, total = m - self.mean, self.count + n
        self.var = (self.var * self.count + v * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / math.sqrt(self.var + 1e-8)


class PromptStream:
    """Prompts in a seeded order that is reshuffled every pass; its state is one integer (the position)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.position = n, seed, 0
        self._epoch, self._order = -1, []

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, i = divmod(self.position, self.n)
            if epoch != self._epoch:  # the order of a pass depends on (seed, pass) alone
                self._order = list(range(self.n))
                random.Random(self.seed * 100_003 + epoch).shuffle(self._order)
                self._epoch = epoch
            out.append(self._order[i])
            self.position += 1
        return out


def run(config: PPOConfig) -> Path:
    """Train and save ``<run_dir>/<name>/model`` (the final actor, HF format); return that path."""
    config.validate()
    trainer = PPOTrainer(config)
    return trainer.train()


class PPOTrainer:
    def __init__(self, config: PPOConfig):
        self.config = c = config
        self.accelerator = acc = stage_accelerator(c.policy, c.minibatch_size, c.max_grad_norm, c.mixed_precision)
        if c.prompts_per_iteration % acc.num_processes:
            # unequal shares can mean unequal numbers of minibatches, and DDP would wait for the missing ones
            raise ValueError(
                f"prompts_per_iteration={c.prompts_per_iteration} must be a multiple of the number of processes, "
                f"{acc.num_processes}"
            )
        self.sharded_parameters = parameters_sharded(acc)
        if c.compile_sampler and self.sharded_parameters:
            raise ValueError("compile_sampler does not work with sharded parameters (FSDP); set it to false")
        self.half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
        self.out = stage_dir(c.run_dir, c.name, c, resumable=True)
        seed_everything(c.seed + acc.process_index)
        run = Path(c.run_dir)
        policy_path = c.policy.name_or_path or str(run / "sft" / "model")
        reward_path = c.reward.name_or_path or str(run / "reward" / "model")
        for role, path in (("policy", policy_path), ("reward", reward_path)):
            if not Path(path).exists() and not c.__dict__[role].name_or_path:
                raise ValueError(f"no {role} model at {path}: run the earlier stage or set {role}.name_or_path")
        self.tokenizer = load_tokenizer(policy_path)
        self.encoder = stage_encoder(self.tokenizer, c.data, c.policy, policy_path, c.max_new_tokens)
        records, _ = load_stage_records(c.data, "prompt", c.run_dir, c.world)
        self.prompts = self.encoder.prompts(r.prompt for r in records)
        require_examples(c.name, len(self.prompts), len(records), self.encoder)
        self.penalty_name, self.coef, self.penalty_kwargs = c.resolved_penalty()
        self.penalty = get_penalty(self.penalty_name)
        self.kl_in_loss = c.kl_in_loss()

        mixed = acc.mixed_precision
        (policy, reference), (reward, frozen_reward) = (load_precisions(m, mixed) for m in (c.policy, c.reward))
        self._fresh_actor = lambda: load_causal_lm(policy, self.tokenizer, path=policy_path)
        self._fresh_critic = lambda: Critic(load_reward_model(reward, self.tokenizer, path=reward_path))
        actor = self._fresh_actor()
        self.reference = load_causal_lm(reference, self.tokenizer, path=policy_path, trainable=False)
        self.reward_model = load_reward_model(frozen_reward, self.tokenizer, path=reward_path, trainable=False)
        critic = self._fresh_critic() if c.advantage == "gae" else None
        actor_opt = adamw(actor.parameters(), acc, c.actor_lr)
        warmup = lambda it: min(1.0, (it + 1) / c.warmup_iterations) if c.warmup_iterations else 1.0  # noqa: E731
        actor_sched = torch.optim.lr_scheduler.LambdaLR(actor_opt, warmup)
        self.actor, self.actor_opt = acc.prepare(actor, actor_opt)
        # once: accelerate's unwrap_model looks for DeepSpeed on disk at every call (0.4 ms where it is installed)
        self.actor_module = acc.unwrap_model(self.actor)
        self.actor_sched = actor_sched
        self.critic = self.critic_opt = self.critic_sched = None
        if critic is not None:
            critic_opt = adamw(critic.parameters(), acc, c.critic_lr)
            self.critic_sched = torch.optim.lr_scheduler.LambdaLR(critic_opt, warmup)
            self.critic, self.critic_opt = acc.prepare(critic, critic_opt)
        self.reference.to(acc.device)
        self.reward_model.to(acc.device)
        self.ptx = self._ptx_data() if c.ptx_coef > 0 else None
        # of this process's part of each weight where parameters are sharded; in float32 whatever the weights'
        # type, as a bf16 average would round away updates of (1 - decay) of a weight (DeepSpeed's bf16 engine
        # holds bf16 weights)
        self.ema = (
            {k: _float32(_local(v).detach()) for k, v in self.actor_module.state_dict().items()}
            if c.ema_decay
            else None
        )
        self.decoding = (
            CompiledDecoding(self.actor_module, max(map(len, self.prompts)) + c.max_new_tokens)
            if c.compile_sampler
            else None
        )
        self.stream = PromptStream(len(self.prompts), c.seed)
        self.moments = RunningMoments()
        self.iteration = 0

    def _autocast(self):
        """Mixed precision for what ``accelerator.prepare`` does not wrap: the frozen models, and sampling, where
        one region over every token casts the actor's weights once instead of at each step. A no-op without
        mixed precision."""
        if self.half is None:
            return contextlib.nullcontext()
        return torch.autocast(self.accelerator.device.type, dtype=self.half)

    # --- the loop --------------------------------------------------------------------------------------------

    def train(self) -> Path:
        c, acc = self.config, self.accelerator
        if c.resume:
            self._load_checkpoint()
        elif acc.is_main_process:
            checkpoints.move_aside(self.out / "checkpoints", "iter")
        acc.wait_for_everyone()
        log = None
        if acc.is_main_process:
            self._truncate_metrics()
            log = MetricsLog(
                self.out / "metrics.jsonl",
                c.logging.tensorboard,
                c.logging.wandb,
                c.logging.wandb_project,
                run_name=f"{Path(c.run_dir).name}-{c.name}",
                resume=True,
            )
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=console, disable=not acc.is_main_process) as progress:
            task = progress.add_task(c.name, total=c.iterations, completed=self.iteration)
            while self.iteration < c.iterations:
                row = self.step()
                self.iteration += 1
                if log is not None and (self.iteration % c.logging.log_every == 0 or self.iteration == c.iterations):
                    log.log(self.iteration, row)
                progress.update(
                    task,
                    advance=1,
                    description=f"{c.name}  reward {row['env/reward']:+.3f}  "
                    f"kl {row['objective/kl']:.3f}  len {row['env/response_length']:.1f}",
                )
                if c.checkpoint_every and self.iteration % c.checkpoint_every == 0 and self.iteration < c.iterations:
                    self._save_checkpoint()
        if log is not None:
            log.close()
        return self._finish()

    def step(self) -> dict[str, float]:
        c, acc = self.config, self.accelerator
        t0 = time.perf_counter()
        # 1. prompts: the same global order on every process, each taking its share
        chosen = self.stream.take(c.prompts_per_iteration)[acc.process_index :: acc.num_processes]
        prompts = [self.prompts[i] for i in chosen for _ in range(c.samples_per_prompt)]
        group = torch.arange(len(chosen)).repeat_interleave(c.samples_per_prompt)
        # 2. generate, with the actor's log-probabilities of the sampled tokens
        with self._autocast():
            responses, logps = generate(
                self.actor_module,
                prompts,
                self.tokenizer,
                c.max_new_tokens,
                c.top_p,
                c.temperature,
                all_done=self._all_done,
                inference_mode=not self.sharded_parameters,
                decoding=self.decoding,
            )
        t1 = time.perf_counter()
        # 3. score: reference log-probabilities, critic values, reward-model scores
        with self._autocast():
            traj = score(
                self.reference,
                self.reward_model,
                self.critic,
                prompts,
                responses,
                logps,
                group,
                self.tokenizer.pad_token_id,
            )
        t2 = time.perf_counter()
        where = f"{c.name}: iteration {self.iteration + 1}"
        check_finite(where, "a reward-model score", traj.scores, "the reward model (reward.name_or_path)")
        # 4. shape rewards
        scores = self._normalized(traj.scores)
        penalty = self.penalty(traj.logp, traj.ref_logp, traj.response_mask, **self.penalty_kwargs)
        in_reward = torch.zeros_like(penalty) if self.kl_in_loss else penalty
        rewards = rl.shape_rewards(scores, in_reward, traj.response_mask, self.coef, c.beta, c.clip_reward_value)
        # 5. advantages
        advantages, returns, advantage_scale = self._advantages(traj, rewards)
        check_finite(where, "an advantage", advantages, "non-finite rewards, values or penalties")
        # 6. PPO epochs over minibatches
        stats = self._optimize(traj, advantages, returns, advantage_scale)
        t3 = time.perf_counter()
        # 7. EMA, adaptive coefficient, metrics
        self._update_ema()
        m = traj.response_mask
        seq_kl = ((traj.logp - traj.ref_logp) * m).sum(-1)
        metrics = {
            "env/reward": traj.scores.mean(),
            "env/reward_shaped": rewards.sum(-1).mean(),
            "env/response_length": m.sum(-1).float().mean(),
            "env/empty_responses": (m.sum(-1) <= 1).float().mean(),
            "env/reward_clipped": (scores.abs() > c.clip_reward_value).float().mean(),
            "objective/penalty": (penalty * m).sum(-1).mean(),
            "objective/kl": seq_kl.mean(),
            "objective/entropy": -(traj.logp * m).sum(-1).mean(),
            "objective/coef": torch.tensor(self.coef),
            "tokens": m.sum().float(),
        }
        metrics = self._mean_over_processes(metrics) | stats
        self._adapt_coef(metrics["objective/kl"])
        tokens = metrics.pop("tokens") * acc.num_processes
        return metrics | {
            "time/generate": t1 - t0,
            "time/score": t2 - t1,
            "time/train": t3 - t2,
            "time/tokens_per_second": tokens / (t3 - t0),
        }

    # --- pieces of the step ----------------------------------------------------------------------------------

    def _all_done(self, done: torch.Tensor) -> bool:
        """Whether sampling may stop. With parameters sharded (ZeRO-3, FSDP) each forward pass gathers them from
        every process, so all decode until the last of them is done."""
        if not self.sharded_parameters:
            return bool(done.all())
        return self.accelerator.reduce((~done).sum().float(), "sum").item() == 0

    def _normalized(self, scores: torch.Tensor) -> torch.Tensor:
        if not self.config.normalize_reward:
            return scores
        self.moments.update(self.accelerator.gather(scores))
        return self.moments.normalize(scores)

    def _advantages(self, traj: Trajectory, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(advantages, returns, scale)``: ``scale`` is what whitening multiplied the advantages by (1 without
        it), which a KL term in the loss takes too, so that its weight against the reward stays ``coef``."""
        c, m = self.config, traj.response_mask
        if c.advantage == "gae":
            advantages, returns = rl.gae(rewards, traj.values, m, c.gamma, c.lam)
        else:
            per_sequence = rl.SEQUENCE_ADVANTAGES[c.advantage](rewards.sum(-1), c.samples_per_prompt)
            advantages, returns = rl.sequence_advantages_to_tokens(per_sequence, m), torch.zeros_like(rewards)
        scale = torch.ones((), device=advantages.device)
        if c.whiten_advantages:
            # every process's tokens count, so splitting the batch does not change the result
            mean, scale = rl.whitening(advantages, m, sum_over_workers=lambda t: self.accelerator.reduce(t, "sum"))
            advantages = (advantages - mean) * scale * m
        return advantages, returns, scale

    def _optimize(
        self, traj: Trajectory, advantages: torch.Tensor, returns: torch.Tensor, advantage_scale: torch.Tensor
    ) -> dict[str, float]:
        c, acc = self.config, self.accelerator
        B = traj.ids.shape[0]
        where = f"{c.name}: iteration {self.iteration + 1}"
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(c.ppo_epochs):
            order = torch.randperm(B)
            for s in range(0, B, c.minibatch_size):
                idx = order[s : s + c.minibatch_size].to(traj.ids.device)
                ids, attn, mask = traj.ids[idx], traj.attention_mask[idx], traj.response_mask[idx]
                scale = self._split_scale(mask)
                logp = token_logprobs(self.actor, ids, attn)
                pg_loss, pg_stats = rl.ppo_policy_loss(logp, traj.logp[idx], advantages[idx], mask, c.clip)
                actor_loss = pg_loss
                if self.kl_in_loss:
                    # summed over responses and divided like the policy loss, whose token mean it joins
                    kl = rl.kl_loss(logp, traj.ref_logp[idx], mask, self.kl_in_loss).sum() / mask.sum().clamp(min=1)
                    actor_loss = actor_loss + self.coef * advantage_scale * kl
                    sums["losses/kl"] = sums.get("losses/kl", 0.0) + kl.item()
                actor_loss = actor_loss * scale
                if self.ptx is not None:
                    ptx_loss = self._ptx_loss()
                    actor_loss = actor_loss + c.ptx_coef * ptx_loss
                    sums["losses/ptx"] = sums.get("losses/ptx", 0.0) + ptx_loss.item()
                optimizer_step(acc, self.actor, self.actor_opt, actor_loss, c.max_grad_norm, f"{where}, actor")
                batch_stats = {
                    "losses/policy": pg_loss.item(),
                    "policy/clipfrac": pg_stats["clipfrac"].item(),
                    "policy/approx_kl": pg_stats["approx_kl"].item(),
                }
                if self.critic is not None:
                    values = critic_values(self.critic, ids, attn)
                    vf_loss, vf_stats = rl.ppo_value_loss(values, traj.values[idx], returns[idx], mask, c.value_clip)
                    optimizer_step(
                        acc,
                        self.critic,
                        self.critic_opt,
                        c.vf_coef * vf_loss * scale,
                        c.max_grad_norm,
                        f"{where}, critic",
                    )
                    batch_stats |= {"losses/value": vf_loss.item(), "value/clipfrac": vf_stats["vf_clipfrac"].item()}
                for k, v in batch_stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
        self.actor_sched.step()
        if self.critic_sched is not None:
            self.critic_sched.step()
        return self._mean_over_processes({k: v / max(steps, 1) for k, v in sums.items()})

    def _split_scale(self, mask: torch.Tensor) -> torch.Tensor:
        """Rescale a per-process token mean so that DDP's gradient averaging gives the global token mean."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return torch.tensor(1.0, device=mask.device)
        local = mask.sum().float()
        return local * acc.num_processes / acc.reduce(local.clone(), "sum").clamp(min=1)

    def _ptx_data(self) -> list[tuple[list[int], list[int]]]:
        c = self.config
        records, _ = load_stage_records(
            DataConfig(**{**c.data.__dict__, "portion": "sft"}), "demonstration", c.run_dir, c.world
        )
        pairs = [(self.encoder.prompt(r.prompt), self.encoder.response(r.response)) for r in records]
        return [(p, r) for p, r in pairs if p is not None]

    def _ptx_loss(self) -> torch.Tensor:
        """PPO-ptx (the textbook chapter): minus the mean log-likelihood of SFT demonstration tokens."""
        batch = random.sample(self.ptx, min(len(self.ptx), self.config.minibatch_size))
        ids, attn, resp = (
            t.to(self.accelerator.device)
            for t in join([p for p, _ in batch], [r for _, r in batch], self.tokenizer.pad_token_id)
        )
        return -rl.masked_mean(token_logprobs(self.actor, ids, attn), resp)

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.config.ema_decay
        with torch.no_grad():
            for k, v in self.actor_module.state_dict().items():
                if v.dtype.is_floating_point:
                    self.ema[k].mul_(d).add_(_local(v).detach(), alpha=1 - d)

    def _adapt_coef(self, kl: float) -> None:
        """Ziegler et al.'s proportional controller: move coef so the sequence KL approaches target_kl."""
        c = self.config
        if c.target_kl > 0:
            error = max(-0.2, min(0.2, kl / c.target_kl - 1))
            self.coef *= 1 + error * c.prompts_per_iteration * c.samples_per_prompt / 10_000

    def _mean_over_processes(self, values: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """Each value averaged over the processes, in one collective call."""
        if not values:
            return {}
        acc = self.accelerator
        stacked = torch.stack(
            [torch.as_tensor(v, dtype=torch.float32, device=acc.device).reshape(()) for v in values.values()]
        )
        if acc.num_processes > 1:
            stacked = acc.reduce(stacked, "mean")
        return dict(zip(values, stacked.tolist(), strict=True))

    # --- checkpoints -----------------------------------------------------------------------------------------

    def _checkpoint_state(self) -> dict:
        """What accelerate's own checkpoint leaves out: the loop's position, the schedulers and the EMA (which
        each process saves on its own where parameters are sharded)."""
        state = {
            "iteration": self.iteration,
            "position": self.stream.position,
            "coef": self.coef,
            "moments": self.moments.__dict__.copy(),
            "actor_sched": self.actor_sched.state_dict(),
            "ema": None if self.sharded_parameters else self.ema,
            "config": to_dict(self.config),
        }
        if self.critic is not None:
            state["critic_sched"] = self.critic_sched.state_dict()
        return state

    def _save_checkpoint(self) -> None:
        """``checkpoints/iter-N/`` (``stages.checkpoints``): the models, optimisers, RNG states and
        ``_checkpoint_state``; under sharded parameters each process's part of the EMA in a file of its own."""
        ema = {"ema": self.ema} if self.sharded_parameters and self.ema is not None else None
        state = self._checkpoint_state()
        checkpoints.save(
            self.accelerator,
            self.out / "checkpoints",
            f"iter-{self.iteration:06d}",
            state,
            self.config.keep_checkpoints,
            ema,
        )

    def _load_checkpoint(self) -> None:
        acc = self.accelerator
        found = checkpoints.load(acc, self.out / "checkpoints", "iter", to_dict(self.config), RESUMABLE_CHANGES)
        if found is None:
            return
        state, path = found
        self.actor_sched.load_state_dict(state["actor_sched"])
        if self.critic is not None:
            self.critic_sched.load_state_dict(state["critic_sched"])
        self.iteration, self.stream.position, self.coef = state["iteration"], state["position"], state["coef"]
        self.moments.__dict__.update(state["moments"])
        ema = state["ema"]
        if self.sharded_parameters and self.config.ema_decay:
            ema = checkpoints.per_process(path, "ema", acc)
        self.ema = {k: v.to(acc.device) for k, v in ema.items()} if ema is not None else None
        console.print(f"resumed {self.config.name} at iteration {self.iteration} from {path}")

    def _truncate_metrics(self) -> None:
        """Keep only the metrics logged up to the iteration the run (re)starts from."""
        path = self.out / "metrics.jsonl"
        atomic_write_text(path, checkpoints.truncated_metrics(path, self.iteration))

    # --- the end ---------------------------------------------------------------------------------------------

    def _finish(self) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = self.out / "model"
        actor = gathered_model(acc, self.actor, self._fresh_actor)
        critic = gathered_model(acc, self.critic, self._fresh_critic) if self.critic is not None else None
        if acc.is_main_process:
            save_model(actor, self.tokenizer, path)
            if critic is not None:
                save_model(critic, self.tokenizer, self.out / "critic")
            summary = self._summary(actor)
        if self.ema is not None:  # last, as it overwrites the actor's weights with their average
            with torch.no_grad():
                for k, v in self.actor_module.state_dict().items():
                    _local(v).copy_(self.ema[k])
            ema = gathered_model(acc, self.actor, self._fresh_actor)
            if acc.is_main_process:
                save_model(ema, self.tokenizer, self.out / "model-ema")
        if acc.is_main_process:
            atomic_write_json(self.out / "summary.json", summary)
        done = finish_stage(self.out)
        acc.wait_for_everyone()
        return done / path.name

    def objective(self) -> dict:
        """What this run optimised, for ``pmrlhf eval`` to find its optimum: the penalty and its arguments, the
        coefficient as it ended (``target_kl`` moves it) and as it started, and how the score was turned into
        the reward (beta, clip, and the standardisation ``normalize_reward`` ended with, which sets the
        optimum's temperature too)."""
        c = self.config
        return {
            "method": "ppo",
            "penalty": self.penalty_name,
            "coef": self.coef,
            "initial_coef": self.config.resolved_penalty()[1],
            "adaptive_coef": c.target_kl > 0,
            "alpha": self.penalty_kwargs.get("alpha"),
            "tau": self.penalty_kwargs.get("tau"),
            "kl_estimator": c.kl_estimator if self.penalty_name == "kl" else None,
            "kl_placement": c.kl_placement if self.penalty_name == "kl" else None,
            "beta": c.beta,
            "clip_reward_value": c.clip_reward_value,
            "reward_normalization": (
                {"mean": self.moments.mean, "std": math.sqrt(self.moments.var + 1e-8)} if c.normalize_reward else None
            ),
        }

    def _summary(self, actor) -> dict:
        objective = self.objective()
        summary = {
            "iterations": self.iteration,
            "penalty": self.penalty_name,
            "coef": self.coef,
            "penalty_kwargs": self.penalty_kwargs,
            "beta": self.config.beta,
            "objective": objective,
        }
        if self.config.data.source == "world":
            from pmrlhf.evaluation.exact import compare_with_closed_forms

            summary["world"] = compare_with_closed_forms(
                actor,
                self.reference,
                self.reward_model,
                self.tokenizer,
                world_dir(self.config.run_dir),
                objective,
                max_new_tokens=self.config.max_new_tokens,
            )
            console.print(_world_line(self.config.name, summary["world"]))
        return summary


# Settings a resumed run may change: those of every stage, and how long it runs.
RESUMABLE_CHANGES = (*checkpoints.MAY_CHANGE, "iterations")


def _float32(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy of a floating-point tensor; a copy of any other as it is."""
    return t.to(torch.float32, copy=True) if t.is_floating_point() else t.clone()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a weight: the local shard of FSDP's DTensor, the weight itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _world_line(name: str, w: dict) -> str:
    return (
        f"[green]{name}[/green]: TV to its own optimum {w['tv_to_own_target']:.3f}, to the reward model "
        f"{w['tv_to_reward_model']:.3f}, to the truth {w['tv_to_truth']:.3f}; "
        f"mass outside M(x) {w['mass_outside_m']:.3f}"
    )
