"""The real-text world's known truth: prompts the project wrote, and two groups of labelers whose rewards are
explicit functions of the text.

A real language model answers the prompts (``stages/realworld.py`` samples it); labelers compare two of its
answers. Each labeler belongs to a group ``g`` and answers under Bradley-Terry with the group's reward
(eq. (2.1)): ``P_g(y1 > y2) = sigmoid(r_g(y1) - r_g(y2))``.

* the majority (share ``1 - w``) wants warm, positive text: ``r_maj(y) = 4 * VADER compound(y)`` (a rule-based
  sentiment score in [-1, 1]; 4 makes a clearly positive answer win against a neutral one about 19 times in 20);
* the minority (share ``w``) wants concise answers: ``r_min(y) = -words(y) / 8`` (eight more words lose one unit).

The two pull apart: VADER's compound grows with every positive word, so the majority also prefers the longer of
two friendly answers. The population's preference is the mixture ``P(y1 > y2) = (1 - w) P_maj + w P_min``
(flipped with probability ``label_noise``). It is not a Bradley-Terry model: that would need
``logit P(a > b) + logit P(b > c) = logit P(a > c)`` for every three answers, which a mixture breaks (``docs/
realtext.md`` gives an instance), so a single reward model fitted to these labels cannot equal it, and the truth
the sampled PM divergence is measured against is the mixture itself.
"""

from __future__ import annotations

import math
import re

REVIEWS = [
    "a coffee shop",
    "a science fiction film",
    "a pair of running shoes",
    "a hotel by the sea",
    "a pizza restaurant",
    "a new phone",
    "a museum of modern art",
    "a city park",
    "a bakery",
    "a jazz album",
    "a train journey",
    "a board game",
]
ADVICE = [
    "How can I sleep better?",
    "How can I save money on groceries?",
    "What should I do before a job interview?",
    "How do I start running?",
    "How can I learn a new language faster?",
    "How can I stay focused while studying?",
    "How do I keep houseplants alive?",
    "How can I make friends in a new city?",
    "What should I pack for a weekend trip?",
    "How do I write a polite email to my landlord?",
    "How can I feel less stressed at work?",
    "How should I prepare for an exam?",
]
SCENES = [
    "a sunset over the sea",
    "a busy market",
    "a rainy afternoon in the city",
    "a mountain village",
    "the smell of fresh bread",
    "a quiet library",
    "a snowy forest",
    "a summer festival",
    "an old lighthouse",
    "a garden in spring",
    "a football match",
    "a kitchen on a holiday morning",
]
PROMPTS = (
    [f"Write a short review of {x}." for x in REVIEWS] + ADVICE + [f"Describe {x} in a few sentences." for x in SCENES]
)
SENTIMENT_SCALE = 4.0  # r_maj = this * VADER compound
WORDS_PER_UNIT = 8.0  # r_min = -words / this
CONCISE_WORDS = 20  # an answer of at most this many words is one the minority asks for (its share, in eval)

_analyzer = None


def sentiment(text: str) -> float:
    """VADER's compound score of ``text``, in [-1, 1]."""
    global _analyzer
    if _analyzer is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _analyzer = SentimentIntensityAnalyzer()
    return _analyzer.polarity_scores(text)["compound"]


def words(text: str) -> int:
    return len(re.findall(r"[\w']+", text))


def majority_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """The majority group's reward of each completion (warmth), in the ``reward.function`` signature."""
    return [SENTIMENT_SCALE * sentiment(c) for c in completions]


def minority_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """The minority group's reward of each completion (concision), in the ``reward.function`` signature."""
    return [-words(c) / WORDS_PER_UNIT for c in completions]


def population_reward(prompts: list[str], completions: list[str], minority_share: float = 1 / 11) -> list[float]:
    """The groups' rewards averaged by their shares: an oracle reward for PPO (``reward.function``). Its
    Bradley-Terry preference is not the population's (the mixture of the groups' preferences), but it is the
    reward each labeler's group would give on average."""
    maj, mino = majority_reward(prompts, completions), minority_reward(prompts, completions)
    return [(1 - minority_share) * a + minority_share * b for a, b in zip(maj, mino, strict=True)]


def group_rewards(texts: list[str]) -> tuple[list[float], list[float]]:
    """``(r_maj, r_min)`` of every text."""
    return majority_reward([], texts), minority_reward([], texts)


def preference(
    a: tuple[float, float], b: tuple[float, float], minority_share: float, label_noise: float = 0.0
) -> float:
    """``P(a > b)`` in the labelling population, from each answer's ``(r_maj, r_min)``."""
    p = (1 - minority_share) * sigmoid(a[0] - b[0]) + minority_share * sigmoid(a[1] - b[1])
    return (1 - label_noise) * p + label_noise * (1 - p)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))
