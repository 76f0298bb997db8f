"""A synthetic preference world with a known truth, small enough to run the whole pipeline on a CPU.

Each prompt ``q<i> :`` has a set M(x) of meaningful responses, short word sequences of different lengths,
and a ground-truth reward r*(x, y) whose Plackett-Luce distribution is the population's preference over
M(x) (eq. (3.2)). Prompts come in three profiles: near-even, lopsided, and with a minority answer of 5-20 %.

The data a pipeline sees is generated the way real RLHF data is:

* demonstrations (SFT) are drawn from a *different*, biased distribution q(y|x) that favours short answers
  (log q = -length_bias * words + noise, Sec. 5.2 attributes collapse to length; every answer keeps at
  least ``ref_floor``), so the SFT model's
  pairwise preferences sit near 0 or 1 for many pairs, as in Figs. 3a / 4a;
* labelers compare pairs drawn from q (mixed with a ``uniform_share`` of uniform draws over M(x), as real
  pipelines sample from several policies, so rare answers get labels) and answer under BTL with r*
  (eq. (2.1)), with optional label noise;
* rankings of K responses are drawn from the Plackett-Luce model with r* (App. A.1).

With ``kind: text`` the world is closer to text: each prompt's answers are the leaves of a tree of word segments
(8-40 words, sharing prefixes the way sentences do, so a rare answer leaves a common one mid-response), the
demonstrators choose at each branching point of the tree (every other token is certain given its prefix, as most
of an LM's tokens are), and the labelers come from two groups, a majority and a minority of ``minority_share``
with a different favourite answer (as in MaxMin-RLHF's 10:1 set-up). The population's preference over M(x) is
the mixture of the groups' Plackett-Luce distributions, and r* is its log (Def. 3.2 for the mixture).

Everything is written as ordinary files: ``sft.jsonl``, ``comparisons.jsonl``, ``rankings.jsonl``,
``prompts.jsonl``, a word-level tokenizer in Hugging Face format (``tokenizer/``), and ``truth.json`` with,
for every prompt, M(x), r*, the true preference proportions and q.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pmrlhf.config import InputError, Seed, read_json, require
from pmrlhf.data.tokenize import EOS, PAD, UNK, word_tokenizer
from pmrlhf.io import atomic_dir

SEP = ":"
PROFILES = ("even", "lopsided", "minority")
KINDS = ("words", "text", "realtext")


@dataclass
class WorldConfig:
    """Sizes and biases of the synthetic world."""

    n_prompts: int = 24  # prompts, cycling through the even / lopsided / minority profiles
    responses_per_prompt: int = 4  # |M(x)|
    min_words: int = 1  # shortest meaningful response
    max_words: int = 6  # longest meaningful response
    vocab_words: int = 40  # response words w0..w{n-1}
    n_demonstrations: int = 6000  # SFT examples, drawn from the biased q
    n_comparisons: int = 3000  # labelled pairs for the reward model
    n_rankings: int = 600  # K-wise rankings for the reward model
    ranking_k: int = 4  # K of each ranking (<= responses_per_prompt)
    length_bias: float = 1.2  # how much q prefers short answers: log q drops this much per word
    ref_noise: float = 1.0  # std of the random part of log q
    ref_floor: float = 0.02  # every answer keeps at least this share of q, so a reference model can learn it
    uniform_share: float = 0.3  # share of labelled pairs drawn uniformly over M(x) rather than from q
    label_noise: float = 0.0  # probability a labeler's answer is flipped
    # words: answers of min_words..max_words words; text: leaves of a tree of segments; realtext: a real model's
    # answers to the prompts of data/realtext.py, labelled by two groups whose rewards are functions of the text
    kind: str = "words"
    segment_words: int = 8  # text: longest segment between branching points (the first: 1-2 times this)
    minority_share: float = 1 / 11  # text, realtext: share of labelers in the minority group
    minority_preference: float = 0.7  # text: the minority group's Plackett-Luce probability of its favourite
    named_labelers: int = 0  # labelers named in each comparison's labeler field, dealt to the groups by share; 0: none
    text_model: str = "fetch:smollm2"  # realtext: the model that answers (responses_per_prompt answers a prompt)
    response_tokens: int = 48  # realtext: longest answer, in tokens
    seed: Seed = 0  # everything in the world follows from this

    def validate(self) -> None:
        least = {"n_prompts": 1, "responses_per_prompt": 2, "n_demonstrations": 0, "n_comparisons": 0, "n_rankings": 0}
        for name, n in least.items():
            require(getattr(self, name) >= n, f"{name} must be >= {n}, got {getattr(self, name)}")
        require(1 <= self.min_words <= self.max_words, "need 1 <= min_words <= max_words")
        ranks = self.kind == "realtext" or 2 <= self.ranking_k <= self.responses_per_prompt  # realtext has none
        require(ranks, "need 2 <= ranking_k <= responses_per_prompt")
        require(
            self.vocab_words**self.min_words >= self.responses_per_prompt, "too few words to make distinct responses"
        )
        require(0 <= self.ref_floor < 1 / self.responses_per_prompt, "need 0 <= ref_floor < 1 / responses_per_prompt")
        require(self.ref_noise >= 0, f"ref_noise must be >= 0 (a standard deviation), got {self.ref_noise}")
        require(0 <= self.label_noise < 0.5, f"label_noise must be in [0, 0.5), got {self.label_noise}")
        require(0 <= self.uniform_share <= 1, f"uniform_share must be in [0, 1], got {self.uniform_share}")
        require(self.kind in KINDS, f"kind must be one of {KINDS}, got {self.kind!r}")
        text = "segment_words >= 3, vocab_words >= 2"
        require(self.kind != "text" or (self.segment_words >= 3 and self.vocab_words >= 2), f"text needs {text}")
        require(self.response_tokens >= 2, f"response_tokens must be >= 2, got {self.response_tokens}")
        if self.kind != "words":
            require(0 <= self.minority_share < 0.5, f"minority_share must be in [0, 0.5), got {self.minority_share}")
            require(0 < self.minority_preference < 1, f"minority_preference in (0, 1): {self.minority_preference}")


@dataclass
class PromptTruth:
    prompt: str
    profile: str
    responses: list[str]  # M(x)
    reward: list[float]  # r*(x, y), centred
    truth: list[float]  # softmax(r*): the population's preference proportions
    ref: list[float]  # q(y|x): the demonstrators' biased distribution
    words: list[int]  # response lengths in words (tokens, without the end-of-sequence token)
    minority: list[int] = field(default_factory=list)  # the answers a minority prefers (indices into M(x))
    groups: list = field(default_factory=list)  # labeler groups as [share, their reward over M(x)]; []: all r*


class World:
    """The truth of a world: its prompts, M(x), r*, the population proportions and q."""

    def __init__(self, config: WorldConfig, prompts: list[PromptTruth]):
        self.config = config
        self.prompts = prompts
        self.by_prompt = {p.prompt: p for p in prompts}

    # --- construction ---------------------------------------------------------------------------------

    @classmethod
    def generate(cls, config: WorldConfig | None = None) -> World:
        config = config or WorldConfig()
        config.validate()
        if config.kind == "realtext":
            raise InputError("a realtext world is sampled from its model by the first stage of a run that reads it")
        g = torch.Generator().manual_seed(config.seed)
        if config.kind == "text":
            return cls(config, [_text_prompt(i, config, g) for i in range(config.n_prompts)])
        prompts = []
        for i in range(config.n_prompts):
            profile = PROFILES[i % len(PROFILES)]
            k = config.responses_per_prompt
            responses, words = _responses(k, config, g)
            truth, minority = _profile_probs(profile, k, g)
            reward = torch.log(truth) - torch.log(truth).mean()
            log_q = -config.length_bias * torch.tensor(words, dtype=torch.float64)
            log_q = log_q + config.ref_noise * torch.randn(k, generator=g, dtype=torch.float64)
            q = (1 - k * config.ref_floor) * torch.softmax(log_q, -1) + config.ref_floor
            prompts.append(
                PromptTruth(
                    f"q{i} {SEP}", profile, responses, reward.tolist(), truth.tolist(), q.tolist(), words, minority
                )
            )
        return cls(config, prompts)

    # --- the data a pipeline sees -----------------------------------------------------------------------

    def demonstrations(self, n: int, g: torch.Generator) -> list[dict]:
        out = []
        for p in self._prompt_draws(n, g):
            y = int(torch.multinomial(torch.tensor(p.ref), 1, generator=g))
            out.append({"prompt": p.prompt, "response": p.responses[y]})
        return out

    def comparisons(self, n: int, g: torch.Generator) -> list[dict]:
        out, names = [], torch.Generator().manual_seed(self.config.seed + 2)
        for p in self._prompt_draws(n, g):
            dist = self._pair_draw(p, torch.float32)
            while True:
                a, b = torch.multinomial(dist, 2, replacement=True, generator=g).tolist()
                if a != b:
                    break
            group, reward = self._labeler(p, g)
            a_wins = torch.rand(1, generator=g).item() < 1 / (1 + math.exp(reward[b] - reward[a]))
            if torch.rand(1, generator=g).item() < self.config.label_noise:
                a_wins = not a_wins
            win, lose = (a, b) if a_wins else (b, a)
            out.append({"prompt": p.prompt, "chosen": p.responses[win], "rejected": p.responses[lose]})
            if self.config.named_labelers:
                out[-1]["labeler"] = self._named(p, group, names)
        return out

    def _named(self, p: PromptTruth, group: int, names: torch.Generator) -> str:
        """One of ``named_labelers`` labelers, dealt to the groups by their shares (at least one each), drawn
        uniformly within ``group`` from ``names``, a generator of its own, so that naming changes no label."""
        sizes = [max(1, round(share * self.config.named_labelers)) for share, _ in p.groups or [(1.0, None)]]
        first = sum(sizes[:group])
        return f"labeler-{first + int(torch.randint(sizes[group], (1,), generator=names))}"

    def rankings(self, n: int, g: torch.Generator) -> list[dict]:
        out = []
        for p in self._prompt_draws(n, g):
            idx = torch.randperm(len(p.responses), generator=g)[: self.config.ranking_k]
            r = torch.tensor(self._labeler(p, g)[1])[idx]
            # Plackett-Luce sampling: sorting r + Gumbel noise draws a ranking with probability (A.1).
            gumbel = -torch.log(-torch.log(torch.rand(len(idx), generator=g, dtype=torch.float64)))
            order = torch.argsort(r + gumbel, descending=True)
            out.append(
                {"prompt": p.prompt, "responses": [p.responses[i] for i in idx.tolist()], "ranking": order.tolist()}
            )
        return out

    def pair_weights(self, p: PromptTruth) -> torch.Tensor:
        """How often ``comparisons`` shows each pair of M(x): ``[k, k]``, symmetric, 0 on the diagonal, summing to
        1 (a pair is two draws from q mixed with the uniform share, redrawn until they differ)."""
        dist = self._pair_draw(p, torch.float64)
        w = (dist[:, None] * dist[None, :]).fill_diagonal_(0)
        return w / w.sum()

    def _pair_draw(self, p: PromptTruth, dtype: torch.dtype) -> torch.Tensor:
        """What each response of a compared pair is drawn from: q mixed with ``uniform_share`` of uniform draws."""
        share = self.config.uniform_share
        return (1 - share) * torch.tensor(p.ref, dtype=dtype) + share / len(p.responses)

    def label_preference(self, p: PromptTruth) -> torch.Tensor:
        """``[k, k]``: the probability that a comparison of ``i`` and ``j`` labels ``i`` the winner, the population's
        pairwise preference. In a world of groups it is their mixture ``sum_g s_g sigmoid(r_g(i) - r_g(j))``, which
        is not BTL in r* = log(truth) (nor in any reward); label noise moves it towards 1/2."""
        groups = p.groups or [(1.0, p.reward)]
        shares = torch.tensor([share for share, _ in groups], dtype=torch.float64)
        rewards = torch.tensor([reward for _, reward in groups], dtype=torch.float64)  # [G, k]
        pref = (shares[:, None, None] * torch.sigmoid(rewards[:, :, None] - rewards[:, None, :])).sum(0)
        return (1 - self.config.label_noise) * pref + self.config.label_noise * (1 - pref)

    @staticmethod
    def _labeler(p: PromptTruth, g: torch.Generator) -> tuple[int, list[float]]:
        """The group of a labeler and the reward it answers with: r*, or in a world of groups that of a group drawn
        by its share."""
        if not p.groups:
            return 0, p.reward
        shares = torch.tensor([share for share, _ in p.groups], dtype=torch.float64)
        group = int(torch.multinomial(shares, 1, generator=g))
        return group, p.groups[group][1]

    def _prompt_draws(self, n: int, g: torch.Generator) -> list[PromptTruth]:
        idx = torch.randint(len(self.prompts), (n,), generator=g).tolist()
        return [self.prompts[i] for i in idx]

    # --- files ---------------------------------------------------------------------------------------------

    def vocabulary(self) -> list[str]:
        return (
            [PAD, EOS, UNK, SEP]
            + [f"q{i}" for i in range(self.config.n_prompts)]
            + [f"w{i}" for i in range(self.config.vocab_words)]
        )

    def write(self, path: Path, replace: bool = True) -> Path:
        """Write every data file, the tokenizer and the truth into ``path`` (atomically; with ``replace=False``
        a world already there, or written there meanwhile, is kept)."""
        c = self.config

        def fill(tmp: Path) -> None:
            g = torch.Generator().manual_seed(c.seed + 1)
            write_jsonl(tmp / "sft.jsonl", self.demonstrations(c.n_demonstrations, g))
            write_jsonl(tmp / "comparisons.jsonl", self.comparisons(c.n_comparisons, g))
            write_jsonl(tmp / "rankings.jsonl", self.rankings(c.n_rankings, g))
            write_jsonl(tmp / "prompts.jsonl", [{"prompt": p.prompt} for p in self.prompts])
            (tmp / "truth.json").write_text(
                json.dumps({"config": asdict(c), "prompts": [asdict(p) for p in self.prompts]}, indent=1)
            )
            word_tokenizer(self.vocabulary()).save_pretrained(tmp / "tokenizer")

        return atomic_dir(Path(path), fill, replace=replace)

    @classmethod
    def load(cls, path: Path) -> World:
        data = read_json(Path(path) / "truth.json", f"remove {path} for the run to write its world again")
        return cls(WorldConfig(**data["config"]), [PromptTruth(**p) for p in data["prompts"]])


FILES = {
    "demonstration": "sft.jsonl",
    "comparison": "comparisons.jsonl",
    "ranking": "rankings.jsonl",
    "prompt": "prompts.jsonl",
}


def ensure_world(path: Path, config: WorldConfig | None = None) -> Path:
    """Generate and write the world into ``path`` unless a complete one is already there. Every process of a
    distributed run may call this at once: the first world written stays (each generates the same one). A world
    already there must be the one ``config`` asks for (``resolve_world``)."""
    path = Path(path)
    if not (path / "truth.json").is_file():
        World.generate(config).write(path, replace=False)
    elif config is not None:
        resolve_world(path, config)
    return path


def resolve_world(path: Path, config: WorldConfig) -> WorldConfig:
    """The settings of the world a run at ``path`` uses: ``config`` where no world is there yet, else the settings
    of the world already there, when ``config`` asks for them or leaves every setting at its default (a stage
    run later in a folder uses the folder's world). Settings of its own that differ from the world there are
    refused, naming each: training on the old world would contradict the run's recorded config."""
    path = Path(path)
    if not (path / "truth.json").is_file():
        return config
    held = World.load(path).config
    if config in (held, WorldConfig()):
        return held
    old, new = asdict(held), asdict(config)
    what = ", ".join(f"{k} = {old[k]} (asked: {v})" for k, v in new.items() if old[k] != v)
    raise InputError(
        f"{path} holds a world made with {what}: use another run folder, or delete {path} to make the world this "
        "config asks for"
    )


def _responses(k: int, config: WorldConfig, g: torch.Generator) -> tuple[list[str], list[int]]:
    span = list(range(config.min_words, config.max_words + 1))
    if k <= len(span):
        lengths = [span[i] for i in torch.randperm(len(span), generator=g)[:k].tolist()]
    else:
        lengths = [span[i] for i in torch.randint(len(span), (k,), generator=g).tolist()]
    seen: set[str] = set()
    responses = []
    for n in lengths:
        while True:
            # The leading space makes prompt + response tokenise as the two tokenised separately.
            text = " " + " ".join(f"w{int(w)}" for w in torch.randint(config.vocab_words, (n,), generator=g))
            if text not in seen:
                break
        seen.add(text)
        responses.append(text)
    return responses, lengths


def _profile_probs(profile: str, k: int, g: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """Population preference proportions over M(x) for a profile, in random order, and where the minority answer
    went (the minority profile; [] for the others)."""

    def dirichlet(alpha: float, n: int) -> torch.Tensor:
        x = torch._standard_gamma(torch.full((n,), alpha, dtype=torch.float64), generator=g)
        return x / x.sum()

    if profile == "even":
        p = dirichlet(30.0, k)
    elif profile == "lopsided":
        top = 0.75 + 0.15 * torch.rand(1, generator=g, dtype=torch.float64)
        p = torch.cat([top, (1 - top) * dirichlet(2.0, k - 1)])
    else:  # one minority answer of 5-20 %, the rest shared unevenly
        minority = 0.05 + 0.15 * torch.rand(1, generator=g, dtype=torch.float64)
        p = torch.cat([minority, (1 - minority) * dirichlet(3.0, k - 1)])
    p = p.clamp(min=1e-3)
    p = p / p.sum()
    order = torch.randperm(k, generator=g)
    return p[order], [int((order == 0).nonzero())] if profile == "minority" else []


def _text_prompt(i: int, config: WorldConfig, g: torch.Generator) -> PromptTruth:
    """One prompt of a text world: its answers are the leaves of a random tree of word segments (a leaf split into
    two continuations until there are ``responses_per_prompt``); q chooses at each split."""
    k, seg = config.responses_per_prompt, config.segment_words

    def segment(lo: int, hi: int, first_not: set[int]) -> list[int]:
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        words = torch.randint(config.vocab_words, (n,), generator=g).tolist()
        while words[0] in first_not:  # two continuations of one prefix differ at their first word
            words[0] = int(torch.randint(config.vocab_words, (1,), generator=g))
        return words

    leaves: list[tuple[list[int], float]] = [(segment(seg, 2 * seg, set()), 0.0)]  # (words, log q)
    while len(leaves) < k:
        words, log_q = leaves.pop(int(torch.randint(len(leaves), (1,), generator=g)))
        split = torch.log_softmax(config.ref_noise * 1.5 * torch.randn(2, generator=g, dtype=torch.float64), -1)
        first = segment(3, seg, set())
        leaves += [
            (words + first, log_q + split[0].item()),
            (words + segment(3, seg, {first[0]}), log_q + split[1].item()),
        ]
    order = torch.randperm(k, generator=g).tolist()
    leaves = [leaves[j] for j in order]
    q = torch.softmax(torch.tensor([lq for _, lq in leaves], dtype=torch.float64), -1)
    q = (1 - k * config.ref_floor) * q + config.ref_floor
    # the majority's preferences are lopsided or even as the words world's; the minority's favourite is another
    # answer, the rest sharing what is left alike
    majority, _ = _profile_probs(PROFILES[i % 2], k, g)
    favourite = int(majority.argmax())
    others = [j for j in range(k) if j != favourite]
    minority_answer = others[int(torch.randint(len(others), (1,), generator=g))]
    minority = torch.full((k,), (1 - config.minority_preference) / (k - 1), dtype=torch.float64)
    minority[minority_answer] = config.minority_preference
    truth = (1 - config.minority_share) * majority + config.minority_share * minority
    reward = torch.log(truth) - torch.log(truth).mean()
    texts = [" " + " ".join(f"w{w}" for w in words) for words, _ in leaves]
    return PromptTruth(
        f"q{i} {SEP}",
        "groups",
        texts,
        reward.tolist(),
        truth.tolist(),
        q.tolist(),
        [len(words) for words, _ in leaves],
        [minority_answer],
        groups=[
            ((1 - config.minority_share), torch.log(majority).tolist()),
            (config.minority_share, torch.log(minority).tolist()),
        ],
    )


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
