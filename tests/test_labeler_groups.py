"""A mixture of Bradley-Terry reward models fitted by EM over named labelers (``pmrlhf rm`` with ``groups``), on
the text world whose two groups of labelers are known."""

import json
from collections import Counter

import pytest
import torch

from pmrlhf.config import ConfigError, InputError
from pmrlhf.data.world import World, WorldConfig
from pmrlhf.stages import reward

NAMED = WorldConfig(kind="text", n_prompts=12, named_labelers=22)


def test_naming_the_labelers_changes_no_label_and_deals_them_to_the_groups_by_share():
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    named = World.generate(NAMED).comparisons(2000, g())
    plain = World.generate(WorldConfig(kind="text", n_prompts=12)).comparisons(2000, g())
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in named] == plain
    counts = Counter(r["labeler"] for r in named)
    assert sorted(counts, key=lambda n: int(n.split("-")[1])) == [f"labeler-{i}" for i in range(22)]
    minority = counts["labeler-20"] + counts["labeler-21"]
    assert abs(minority / 2000 - 1 / 11) < 0.02  # the last two are the minority group's


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    run = tmp_path_factory.mktemp("mixture")
    reward.run(reward.RewardConfig(run_dir=str(run), world=NAMED, groups=2))
    return run


def test_the_tabular_start_finds_the_groups_where_responses_recur_and_stands_aside_where_they_do_not():
    rows = World.generate(NAMED).comparisons(1500, torch.Generator().manual_seed(0))
    train = [(r["prompt"].split(), [r["chosen"].split(), r["rejected"].split()], r["labeler"]) for r in rows]
    names = sorted({r["labeler"] for r in rows})
    labeler = torch.tensor([names.index(r["labeler"]) for r in rows])
    posterior = reward.tabular_start(train, labeler, 2, torch.Generator().manual_seed(0))
    minority = int(posterior[names.index("labeler-20")].argmax())
    for i, name in enumerate(names):
        assert posterior[i, minority] > 0.99 if name in ("labeler-20", "labeler-21") else posterior[i, minority] < 0.01
    once = [(p, [c + [str(i)], r], n) for i, (p, (c, r), n) in enumerate(train)]  # every chosen answer its own
    assert reward.tabular_start(once, labeler, 2, torch.Generator().manual_seed(0)) is None


def test_em_puts_every_labeler_in_its_group_and_gives_the_minority_its_share(mixture):
    found = json.loads((mixture / "reward" / "mixture.json").read_text())
    assert found["start"] == "tabular"
    minority = min(range(2), key=lambda g: found["shares"][g])
    assert abs(found["shares"][minority] - 1 / 11) < 0.01
    for name, posterior in found["labelers"].items():
        in_minority = name in ("labeler-20", "labeler-21")
        assert posterior[minority] > 0.9 if in_minority else posterior[minority] < 0.1, name
    summary = json.loads((mixture / "reward" / "summary.json").read_text())
    assert summary["group_shares"] == found["shares"]
    kept = summary["minority_share"]
    assert kept["truth"] == pytest.approx(0.1817, abs=1e-4) and kept["learnable"] == pytest.approx(0.1637, abs=1e-4)
    assert 0.1 < kept["reward_model"] < 0.3


def test_the_mixture_loads_in_plain_transformers_and_is_refused_where_one_reward_is_needed(mixture):
    from transformers import AutoModelForSequenceClassification

    from pmrlhf.config import ModelConfig
    from pmrlhf.models import load_reward_model, load_tokenizer

    path = mixture / "reward" / "model"
    assert AutoModelForSequenceClassification.from_pretrained(path).score.weight.shape[0] == 2
    with pytest.raises(InputError, match="gives 2 scores .a mixture of labeler groups.., not the one reward needed"):
        load_reward_model(ModelConfig(), load_tokenizer(path), path=path, trainable=False)


def test_a_mixture_needs_named_comparisons_and_pairs(tmp_path):
    with pytest.raises(InputError, match="3000 of the comparisons of world name none"):
        reward.run(reward.RewardConfig(run_dir=str(tmp_path), world=WorldConfig(kind="text", n_prompts=4), groups=2))
    with pytest.raises(ConfigError, match="groups > 1 fits comparisons"):
        reward.RewardConfig(groups=2, data_kind="ranking").validate()


def test_a_mixture_resumed_from_a_checkpoint_ends_as_the_run_that_never_stopped(tmp_path):
    """The EM state (every comparison's latest likelihoods, the groups' prior) is checkpointed with the model."""
    import shutil

    from helpers import model_weights
    from pmrlhf.config import OptimConfig

    world = WorldConfig(kind="text", n_prompts=4, named_labelers=6, n_comparisons=400)
    settings = dict(world=world, groups=2, checkpoint_every=5, keep_checkpoints=10, optim=OptimConfig(epochs=2))
    reward.run(reward.RewardConfig(run_dir=str(tmp_path / "straight"), **settings))
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    stage = tmp_path / "resumed" / "reward.partial"
    (tmp_path / "resumed" / "reward").rename(stage)
    later = sorted((stage / "checkpoints").iterdir())[2:]  # resume at step 15, in the second epoch
    assert later and all(shutil.rmtree(c) is None for c in later)
    reward.run(reward.RewardConfig(run_dir=str(tmp_path / "resumed"), resume=True, **settings))
    a, b = (model_weights(tmp_path / run / "reward" / "model") for run in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    mixtures = [(tmp_path / run / "reward" / "mixture.json").read_text() for run in ("straight", "resumed")]
    assert mixtures[0] == mixtures[1]
