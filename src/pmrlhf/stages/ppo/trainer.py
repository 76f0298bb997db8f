"""The PPO trainer: the four roles on one ``Accelerator``, and the iteration of the package's docstring, one call
per step."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pmrlhf.config import InputError, to_dict
from pmrlhf.io import atomic_write_json, console, progress_bar
from pmrlhf.models import Critic, WithoutAdapter, load_causal_lm, load_reward_model, load_tokenizer, save_model
from pmrlhf.models.sampling import CompiledDecoding, generate
from pmrlhf.models.scoring import critic_values, token_logprobs
from pmrlhf.objectives import rl
from pmrlhf.stages.ppo.config import PPOConfig, objective, reward_function
from pmrlhf.stages.ppo.rollout import (
    Demonstrations,
    PromptStream,
    RunningMoments,
    Trajectory,
    function_scores,
    rollout_metrics,
    sample_rows,
    score,
)
from pmrlhf.stages.run_folder import (
    finish_stage,
    load_stage_records,
    require_examples,
    stage_dir,
    stage_encoder,
    write_objective,
)
from pmrlhf.training import checkpoints
from pmrlhf.training.ema import EMA
from pmrlhf.training.guards import check_finite, check_weights_finite
from pmrlhf.training.optim import adamw, lr_schedule, optimizer_step, token_mean_share
from pmrlhf.training.setup import (
    frozen_autocast,
    gathered_model,
    mean_over_processes,
    parameters_sharded,
    seed_everything,
    stage_accelerator,
)

# Settings a resumed run may change: those of every stage, and how long it runs.
RESUMABLE_CHANGES = (*checkpoints.MAY_CHANGE, "iterations")


def run(config: PPOConfig) -> Path:
    """Train and save ``<run_dir>/<name>/model`` (the final actor, HF format); return that path."""
    config.validate()
    return PPOTrainer(config).train()


class PPOTrainer:
    def __init__(self, config: PPOConfig):
        self.config = c = config
        acc = stage_accelerator(c.policy, c.optim.batch_size, c.optim.max_grad_norm, c.mixed_precision)
        self.accelerator = acc
        if c.prompts_per_iteration % acc.num_processes:
            # unequal shares can mean unequal numbers of minibatches, and DDP would wait for the missing ones
            raise InputError(
                f"prompts_per_iteration={c.prompts_per_iteration} must be a multiple of the number of processes, "
                f"{acc.num_processes}"
            )
        self.sharded_parameters = parameters_sharded(acc)
        if c.compile_sampler and self.sharded_parameters:
            raise InputError("compile_sampler does not work with sharded parameters (FSDP); set it to false")
        self.out = stage_dir(c.run_dir, c.name, c, resumable=True)
        seed_everything(c.seed + acc.process_index)
        run = Path(c.run_dir)
        self.policy_path = c.policy.name_or_path or str(run / "sft" / "model")
        self.reward_path = c.reward.name_or_path or str(run / "reward" / "model")
        for role, path in (("policy", self.policy_path), ("reward", self.reward_path)):
            if not Path(path).exists() and not getattr(c, role).name_or_path:
                raise InputError(f"no {role} model at {path}: run the earlier stage or set {role}.name_or_path")
        self.tokenizer = load_tokenizer(self.policy_path)
        self.encoder = stage_encoder(self.tokenizer, c.data, c.policy, self.policy_path, c.max_new_tokens)
        records, _ = load_stage_records(c.data, "prompt", c.run_dir, c.world)
        self.prompts = self.encoder.prompts(r.prompt for r in records)
        require_examples(c.name, len(self.prompts), len(records), self.encoder)
        self.penalty, self.coef = c.penalty.rule().penalty, c.penalty.coefficient()
        self.reward_function = reward_function(c.reward_function) if c.reward_function else None
        self._load_roles()
        ptx = c.ptx_coef > 0
        self.ptx = (
            Demonstrations(c.data, c.run_dir, c.world, self.encoder, self.tokenizer.pad_token_id) if ptx else None
        )
        self.ema = EMA(self.actor_module, c.ema_decay) if c.ema_decay else None
        self.decoding = (
            CompiledDecoding(self.actor_module, max(map(len, self.prompts)) + c.max_new_tokens)
            if c.compile_sampler
            else None
        )
        self.stream = PromptStream(len(self.prompts), c.seed)
        self.moments = RunningMoments()
        self.iteration = 0

    def _load_roles(self) -> None:
        """The actor and the frozen reference from the SFT model; the frozen reward model, and the critic from it
        (InstructGPT, DeepSpeed-Chat). With mixed precision the trained roles keep float32 weights and the frozen
        ones are held in the half type. A role trained with LoRA holds the only copy of its base: the reference
        is the actor with its adapter off, and the reward model the critic with its adapter off."""
        c, acc = self.config, self.accelerator
        policy, reference, critic_model, frozen_reward = c.role_models(
            max(map(len, self.prompts)), acc.num_processes, acc.mixed_precision
        )
        self._fresh_actor = lambda: load_causal_lm(policy, self.tokenizer, path=self.policy_path)
        self._fresh_critic = lambda: Critic(load_reward_model(critic_model, self.tokenizer, path=self.reward_path))
        actor = self._fresh_actor()
        critic_is_reward = c.advantage == "gae" and c.reward.lora_r > 0
        if not c.policy.lora_r:
            self.reference = load_causal_lm(reference, self.tokenizer, path=self.policy_path, trainable=False)
        if not critic_is_reward:
            self.reward_model = load_reward_model(frozen_reward, self.tokenizer, path=self.reward_path, trainable=False)
        critic = self._fresh_critic() if c.advantage == "gae" else None
        # the schedules step once per iteration, and are built on the optimisers before accelerate wraps them
        actor_opt = adamw(actor.parameters(), acc, c.optim.lr, c.optim.weight_decay)
        self.actor_sched = lr_schedule(actor_opt, c.optim, c.iterations)
        self.actor, self.actor_opt = acc.prepare(actor, actor_opt)
        # once: accelerate's unwrap_model looks for DeepSpeed on disk at every call where it is installed
        self.actor_module = acc.unwrap_model(self.actor)
        self.critic = self.critic_opt = self.critic_sched = None
        if critic is not None:
            critic_opt = adamw(critic.parameters(), acc, c.critic_lr, c.optim.weight_decay)
            self.critic_sched = lr_schedule(critic_opt, c.optim, c.iterations)
            self.critic, self.critic_opt = acc.prepare(critic, critic_opt)
        if c.policy.lora_r:
            self.reference = WithoutAdapter(self.actor_module)
        if critic_is_reward:
            self.reward_model = WithoutAdapter(acc.unwrap_model(self.critic).model)
        self.reference.to(acc.device)
        self.reward_model.to(acc.device)

    # --- the loop --------------------------------------------------------------------------------------------

    def train(self) -> Path:
        c, acc = self.config, self.accelerator
        run_name = f"{Path(c.run_dir).name}-{c.name}"
        found, log = checkpoints.begin(acc, self.out, c, "iter", RESUMABLE_CHANGES, run_name=run_name)
        if found:
            self._restore(*found)
        with progress_bar(not acc.is_main_process) as progress:
            task = progress.add_task(c.name, total=c.iterations, completed=self.iteration)
            while self.iteration < c.iterations:
                row = self.step()
                self.iteration += 1
                if log is not None and (self.iteration % c.logging.log_every == 0 or self.iteration == c.iterations):
                    log.log(self.iteration, row)
                if log is not None and c.logging.samples_every and self.iteration % c.logging.samples_every == 0:
                    log.samples(self.iteration, sample_rows(self.tokenizer, *self.last_samples))
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
        c, t0 = self.config, time.perf_counter()
        prompts, group = self._next_prompts()  # 1
        responses, logps = self._generate(prompts)  # 2
        t1 = time.perf_counter()
        traj = self._score(prompts, responses, logps, group)  # 3
        t2 = time.perf_counter()
        scores, penalty, rewards = self._shape_rewards(traj)  # 4
        advantages, returns, advantage_scale = self._advantages(traj, rewards)  # 5
        stats = self._update(traj, advantages, returns, advantage_scale)  # 6
        t3 = time.perf_counter()
        if self.ema is not None:  # 7
            self.ema.update()
        rollout = rollout_metrics(traj, scores, penalty, rewards, self.coef, c)
        metrics = mean_over_processes(self.accelerator, rollout) | stats
        if c.adaptive_kl.target > 0:
            responses = c.prompts_per_iteration * c.samples_per_prompt
            self.coef = rl.adaptive_coef(
                self.coef, metrics["objective/kl"], c.adaptive_kl.target, responses, c.adaptive_kl.horizon
            )
        tokens = metrics.pop("tokens") * self.accelerator.num_processes
        times = {"generate": t1 - t0, "score": t2 - t1, "train": t3 - t2, "tokens_per_second": tokens / (t3 - t0)}
        return metrics | {f"time/{k}": v for k, v in times.items()}

    # --- the steps -------------------------------------------------------------------------------------------

    def _next_prompts(self) -> tuple[list[list[int]], torch.Tensor]:
        """The same global order on every process, each taking its share; each prompt ``samples_per_prompt``
        times, with the index of its group."""
        c, acc = self.config, self.accelerator
        chosen = self.stream.take(c.prompts_per_iteration)[acc.process_index :: acc.num_processes]
        prompts = [self.prompts[i] for i in chosen for _ in range(c.samples_per_prompt)]
        return prompts, torch.arange(len(chosen)).repeat_interleave(c.samples_per_prompt)

    def _generate(self, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
        """Responses, with the actor's log-probabilities of the sampled tokens."""
        c = self.config
        with frozen_autocast(self.accelerator):
            return generate(
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

    def _score(self, prompts, responses, logps, group) -> Trajectory:
        """Reference log-probabilities, critic values, the reward model's or the reward function's scores."""
        c, models = self.config, (self.reference, self.reward_model, self.critic)
        with frozen_autocast(self.accelerator):
            traj = score(*models, prompts, responses, logps, group, self.tokenizer.pad_token_id)
        kind, cause, fn = "model", "the reward model", self.reward_function
        if fn is not None:
            kind, cause = "function", c.reward_function
            traj = traj._replace(scores=function_scores(fn, self.tokenizer, prompts, responses).to(traj.ids.device))
        check_finite(self._where(), f"a reward-{kind} score", traj.scores, cause)
        self.last_samples = prompts, responses, traj.scores
        return traj

    def _shape_rewards(self, traj: Trajectory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scores, penalty, rewards)``: per-token rewards ``-coef * penalty_t`` plus ``clip(r_theta) / beta``
        on the last token (``rl.shape_rewards``); a KL in the loss leaves the penalty out of them."""
        c = self.config
        scores = self._normalized(traj.scores)
        penalty = self.penalty(traj.logp, traj.ref_logp, traj.response_mask, **c.penalty.kwargs())
        in_reward = torch.zeros_like(penalty) if c.penalty.kl_in_loss() else penalty
        rewards = rl.shape_rewards(scores, in_reward, traj.response_mask, self.coef, c.beta, c.clip_reward_value)
        return scores, penalty, rewards

    def _advantages(self, traj: Trajectory, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(advantages, returns, scale)``: GAE with the critic, or RLOO / group-mean baselines without one.
        ``scale`` is what whitening multiplied the advantages by (1 without it), which a KL term in the loss takes
        too, so that its weight against the reward stays ``coef``."""
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
        check_finite(self._where(), "an advantage", advantages, "non-finite rewards, values or penalties")
        return advantages, returns, scale

    def _update(
        self, traj: Trajectory, advantages: torch.Tensor, returns: torch.Tensor, advantage_scale: torch.Tensor
    ) -> dict[str, float]:
        """PPO epochs over minibatches: the clipped policy loss (+ a KL estimator, + PPO-ptx), then the clipped
        value loss; each schedule steps once per iteration."""
        c = self.config
        B, size = traj.ids.shape[0], c.optim.batch_size
        sums: dict[str, float] = {}
        steps = 0
        ratios = []
        for epoch in range(int(c.optim.epochs)):
            order = torch.randperm(B)
            for s in range(0, B, size):
                idx = order[s : s + size].to(traj.ids.device)
                share = token_mean_share(self.accelerator, traj.response_mask[idx])
                stats, ratio = self._actor_step(traj, idx, advantages[idx], advantage_scale, share)
                ratios += [ratio] if epoch == 0 else []  # the sampler against the trainer (and earlier steps)
                if self.critic is not None:
                    stats |= self._critic_step(traj, idx, returns[idx], share)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
        self.actor_sched.step()
        if self.critic_sched is not None:
            self.critic_sched.step()
        ratio = torch.cat(ratios)
        means = {k: v / max(steps, 1) for k, v in sums.items()} | {"policy/ratio": ratio.mean().item()}
        return mean_over_processes(self.accelerator, means | {"policy/ratio_std": ratio.std(unbiased=False).item()})

    def _actor_step(self, traj, idx, advantages, advantage_scale, share) -> tuple[dict[str, float], torch.Tensor]:
        """One gradient step of the actor; its stats, and the ratio of each response token before the step."""
        c = self.config
        ids, attn, mask = traj.ids[idx], traj.attention_mask[idx], traj.response_mask[idx]
        logp = token_logprobs(self.actor, ids, attn, keep=mask)
        normalizer = rl.loss_normalizer(mask, c.loss_normalization, c.max_new_tokens)
        pg_loss, pg_stats = rl.ppo_policy_loss(logp, traj.logp[idx], advantages, mask, c.clip, normalizer)
        loss, stats = pg_loss, {}
        if estimator := c.penalty.kl_in_loss():  # summed over responses, divided like the policy loss's token sum
            kl_sum = rl.kl_loss(logp, traj.ref_logp[idx], mask, estimator).sum()
            loss = loss + self.coef * advantage_scale * kl_sum / normalizer
            stats["losses/kl"] = (kl_sum / mask.shape[0]).item()
        if c.loss_normalization == "token_mean":  # a constant divisor is the same on every process: no correction
            loss = loss * share
        if self.ptx is not None:
            ids, attn, resp = self.ptx.sample(c.optim.batch_size, self.accelerator.device)
            # PPO-ptx (the textbook chapter): minus the mean log-likelihood of SFT demonstration tokens
            ptx_loss = -rl.masked_mean(token_logprobs(self.actor, ids, attn, keep=resp), resp)
            loss = loss + c.ptx_coef * ptx_loss
            stats["losses/ptx"] = ptx_loss.item()
        where = f"{self._where()}, actor"
        optimizer_step(self.accelerator, self.actor, self.actor_opt, loss, c.optim.max_grad_norm, where)
        ratio = torch.exp(logp.detach() - traj.logp[idx])[mask.bool()]
        return stats | {
            "losses/policy": pg_loss.item(),
            "policy/clipfrac": pg_stats["clipfrac"].item(),
            "policy/approx_kl": pg_stats["approx_kl"].item(),
        }, ratio

    def _critic_step(self, traj, idx, returns, share) -> dict[str, float]:
        c = self.config
        values = critic_values(self.critic, traj.ids[idx], traj.attention_mask[idx])
        vf_loss, vf_stats = rl.ppo_value_loss(values, traj.values[idx], returns, traj.response_mask[idx], c.value_clip)
        loss = c.vf_coef * vf_loss * share
        where = f"{self._where()}, critic"
        optimizer_step(self.accelerator, self.critic, self.critic_opt, loss, c.optim.max_grad_norm, where)
        return {"losses/value": vf_loss.item(), "value/clipfrac": vf_stats["vf_clipfrac"].item()}

    # --- what the steps share --------------------------------------------------------------------------------

    def _where(self) -> str:
        return f"{self.config.name}: iteration {self.iteration + 1}"

    def _all_done(self, done: torch.Tensor) -> bool:
        """Whether sampling may stop. With parameters sharded (FSDP) each forward pass gathers them from every
        process, so all decode until the last of them is done."""
        if not self.sharded_parameters:
            return bool(done.all())
        return self.accelerator.reduce((~done).sum().float(), "sum").item() == 0

    def _normalized(self, scores: torch.Tensor) -> torch.Tensor:
        if not self.config.normalize_reward:
            return scores
        self.moments.update(self.accelerator.gather(scores))
        return self.moments.normalize(scores)

    # --- checkpoints -----------------------------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        """``checkpoints/iter-N/``: models, optimisers, RNG states, position, schedules, EMA (sharded: per process)."""
        state = {
            "step": self.iteration,
            "position": self.stream.position,
            "coef": self.coef,
            "moments": self.moments.__dict__.copy(),
            "actor_sched": self.actor_sched.state_dict(),
            "critic_sched": self.critic_sched.state_dict() if self.critic is not None else None,
            "ema": self.ema.weights if self.ema is not None and not self.sharded_parameters else None,
            "config": to_dict(self.config),
        }
        shards = {"ema": self.ema.weights} if self.sharded_parameters and self.ema is not None else None
        root, name = self.out / "checkpoints", f"iter-{self.iteration:06d}"
        checkpoints.save(self.accelerator, root, name, state, self.config.keep_checkpoints, shards)

    def _restore(self, state: dict, path: Path) -> None:
        acc = self.accelerator
        self.actor_sched.load_state_dict(state["actor_sched"])
        if self.critic is not None:
            self.critic_sched.load_state_dict(state["critic_sched"])
        self.iteration, self.stream.position, self.coef = state["step"], state["position"], state["coef"]
        self.moments.__dict__.update(state["moments"])
        if self.ema is not None:
            ema = checkpoints.per_process(path, "ema", acc) if self.sharded_parameters else state["ema"]
            self.ema.load(ema, acc.device)
        console.print(f"resumed {self.config.name} at iteration {self.iteration} from {path}")

    # --- the end ---------------------------------------------------------------------------------------------

    def _finish(self) -> Path:
        acc = self.accelerator
        for model in filter(None, (self.actor, self.critic)):  # the last steps' weights were never checked
            check_weights_finite(f"{self.config.name}: a model to save", model)
        acc.wait_for_everyone()
        path = self.out / "model"
        actor = gathered_model(acc, self.actor, self._fresh_actor)
        critic = gathered_model(acc, self.critic, self._fresh_critic) if self.critic is not None else None
        if acc.is_main_process:  # the EMA copies into the actor after this, which needs its LoRA layers unmerged
            save_model(actor, self.tokenizer, path, keep=self.ema is not None)
            if critic is not None:
                save_model(critic, self.tokenizer, self.out / "critic")
        if self.ema is not None:  # last, as it overwrites the actor's weights with their average
            self.ema.copy_to_model()
            ema = gathered_model(acc, self.actor, self._fresh_actor)
            if acc.is_main_process:
                save_model(ema, self.tokenizer, self.out / "model-ema")
        if acc.is_main_process:
            write_objective(self.out, objective(self.config, self.coef, self.moments))
            atomic_write_json(
                self.out / "summary.json", {"iterations": self.iteration, "encoding": dict(self.encoder.counts)}
            )
        done = finish_stage(self.out)
        acc.wait_for_everyone()
        return done / path.name
