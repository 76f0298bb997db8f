"""Experience for PPO: the prompts of each iteration, the ``Trajectory`` of a batch of sampled responses scored
by the frozen models and the critic, and the demonstrations of PPO-ptx."""

from __future__ import annotations

import dataclasses
import math
import random
from typing import NamedTuple

import torch

from pmrlhf.config import DataConfig, InputError
from pmrlhf.data.world import WorldConfig
from pmrlhf.models.scoring import critic_values, join, sequence_scores, token_logprobs
from pmrlhf.stages.run_folder import load_stage_records


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


class Demonstrations:
    """The SFT portion's demonstrations, encoded, for PPO-ptx's log-likelihood term."""

    def __init__(self, data: DataConfig, run_dir: str, world: WorldConfig, encoder, pad_id: int):
        records, _ = load_stage_records(dataclasses.replace(data, portion="sft"), "demonstration", run_dir, world)
        pairs = [(encoder.prompt(r.prompt), encoder.response(r.response)) for r in records]
        self.pairs, self.pad_id = [(p, r) for p, r in pairs if p is not None], pad_id

    def sample(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` of them drawn at random: ids, attention mask and response mask (``scoring.join``)."""
        batch = random.sample(self.pairs, min(len(self.pairs), n))
        return tuple(t.to(device) for t in join([p for p, _ in batch], [r for _, r in batch], self.pad_id))


class Trajectory(NamedTuple):
    """One batch of generated responses and everything PPO needs about them. ``B`` sequences, ``T`` tokens.

    Sequences are ``prompt + response`` right-padded; per-token tensors are aligned with the token they
    score (position ``t`` holds ``log pi(ids[t] | ids[<t])``), and ``response_mask`` marks response tokens.
    """

    ids: torch.Tensor  # [B, T] token ids
    attention_mask: torch.Tensor  # [B, T] 1 on prompt and response tokens
    response_mask: torch.Tensor  # [B, T] 1 on response tokens (the end-of-sequence token included)
    logp: torch.Tensor  # [B, T] actor log-probabilities at sampling time
    ref_logp: torch.Tensor  # [B, T] reference log-probabilities
    values: torch.Tensor  # [B, T] critic values of the state before each token (zeros without a critic)
    scores: torch.Tensor  # [B] reward-model scores of the whole response
    prompt_index: torch.Tensor  # [B] which prompt of the batch each sample answers (groups for RLOO)


@torch.no_grad()
def score(
    reference,
    reward_model,
    critic,
    prompts: list[list[int]],
    responses: list[list[int]],
    response_logp: list[list[float]],
    prompt_index: torch.Tensor,
    pad_id: int,
) -> Trajectory:
    """Reference log-probabilities, critic values and reward-model scores; the actor's come from sampling."""
    device = next(reference.parameters()).device
    ids, attn, resp = (t.to(device) for t in join(prompts, responses, pad_id))
    logp = torch.zeros(resp.shape, dtype=torch.float32, device=device)
    logp[resp.bool()] = torch.tensor([x for row in response_logp for x in row], dtype=torch.float32, device=device)
    ref_logp = token_logprobs(reference, ids, attn, keep=resp)
    values = critic_values(critic, ids, attn) * resp if critic is not None else torch.zeros_like(logp)
    scores = sequence_scores(reward_model, ids, attn)
    return Trajectory(ids, attn, resp, logp, ref_logp, values, scores, prompt_index.to(device))


def rollout_metrics(traj: Trajectory, scores, penalty, rewards, coef: float, config) -> dict[str, torch.Tensor]:
    """What an iteration's samples say, per process: reward, length, penalty, KL and entropy of the responses."""
    m = traj.response_mask
    return {
        "env/reward": traj.scores.mean(),
        "env/reward_shaped": rewards.sum(-1).mean(),
        "env/response_length": m.sum(-1).float().mean(),
        "env/empty_responses": (m.sum(-1) <= 1).float().mean(),
        "env/reward_clipped": (scores.abs() > config.clip_reward_value).float().mean(),
        "objective/penalty": (penalty * m).sum(-1).mean(),
        "objective/kl": ((traj.logp - traj.ref_logp) * m).sum(-1).mean(),
        "objective/entropy": -(traj.logp * m).sum(-1).mean(),
        "objective/coef": torch.tensor(coef),
        "tokens": m.sum().float(),
    }


def function_scores(function, tokenizer, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
    """A reward function's scores (``reward_function``): called as TRL calls one, with the prompts and the
    completions as text (special tokens left out), one number per completion."""
    text = lambda ids: [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]  # noqa: E731
    scores = list(function(prompts=text(prompts), completions=text(responses)))
    if len(scores) != len(responses):
        raise InputError(f"the reward function gave {len(scores)} scores for {len(responses)} completions")
    return torch.tensor(scores, dtype=torch.float32)


def sample_rows(tokenizer, prompts: list[list[int]], responses: list[list[int]], scores, n: int = 4) -> list[dict]:
    """The first ``n`` prompts of an iteration with their completions and scores, as a person reads them."""
    return [
        {
            "prompt": tokenizer.decode(p, skip_special_tokens=True).strip(),
            "completion": tokenizer.decode(r, skip_special_tokens=True).strip(),
            "reward": round(float(score), 4),
        }
        for p, r, score in list(zip(prompts, responses, scores.tolist(), strict=True))[:n]
    ]
