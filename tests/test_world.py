import itertools
import math
import os

import pytest
import torch

from pmrlhf.data.world import World, WorldConfig
from pmrlhf.io import read_jsonl


def small_world(**kw):
    return World.generate(WorldConfig(**{"n_prompts": 12, **kw}))


def test_profiles_lengths_and_truth():
    w = small_world()
    for p in w.prompts:
        assert len(p.responses) == 4 and len(set(p.words)) == 4  # different token lengths
        torch.testing.assert_close(torch.softmax(torch.tensor(p.reward), -1), torch.tensor(p.truth))
        assert abs(sum(p.ref) - 1) < 1e-9
    minority = [p for p in w.prompts if p.profile == "minority"]
    assert minority and all(0.05 <= p.truth[p.minority[0]] <= 0.2 for p in minority)
    assert all(p.minority == [] for p in w.prompts if p.profile != "minority")
    assert all(max(p.truth) >= 0.75 for p in w.prompts if p.profile == "lopsided")
    assert all(max(p.truth) < 0.5 for p in w.prompts if p.profile == "even")


def test_demonstrations_are_biased_towards_short_answers():
    """q, the demonstrators' distribution, is lopsided and favours short answers; the SFT model trained on it
    sharpens that further (its pairs near 0 or 1 are checked in tests/test_evaluation.py)."""
    w = World.generate(WorldConfig())
    p_ref, short_wins = [], []
    for p in w.prompts:
        for a, b in itertools.combinations(range(len(p.responses)), 2):
            p_ref.append(p.ref[a] / (p.ref[a] + p.ref[b]))
            short_wins.append((p.words[a] < p.words[b]) == (p.ref[a] > p.ref[b]))
    p_ref = torch.tensor(p_ref)
    assert ((p_ref <= 0.1) | (p_ref >= 0.9)).float().mean() > 0.3
    assert sum(short_wins) / len(short_wins) > 0.7
    assert min(min(p.ref) for p in w.prompts) >= w.config.ref_floor - 1e-12


def test_labelers_follow_btl_with_the_true_reward():
    w = small_world(n_prompts=3, uniform_share=1.0)
    g = torch.Generator().manual_seed(0)
    rows = w.comparisons(20000, g)
    p = w.prompts[0]
    a, b = p.responses[0], p.responses[1]
    wins = sum(r["chosen"] == a for r in rows if r["prompt"] == p.prompt and {r["chosen"], r["rejected"]} == {a, b})
    total = sum(1 for r in rows if r["prompt"] == p.prompt and {r["chosen"], r["rejected"]} == {a, b})
    expected = 1 / (1 + math.exp(p.reward[1] - p.reward[0]))
    assert total > 500 and abs(wins / total - expected) < 4 * math.sqrt(expected * (1 - expected) / total)


def test_label_noise_flips_answers():
    w = small_world(n_prompts=3, uniform_share=1.0, label_noise=0.4)
    rows = w.comparisons(20000, torch.Generator().manual_seed(0))
    p = w.prompts[0]
    best = p.responses[max(range(4), key=lambda i: p.reward[i])]
    involving = [r for r in rows if r["prompt"] == p.prompt and best in (r["chosen"], r["rejected"])]
    win_rate = sum(r["chosen"] == best for r in involving) / len(involving)
    assert win_rate < 0.65  # without noise the best answer wins far more often


def test_rankings_are_plackett_luce():
    w = small_world(n_prompts=1, ranking_k=4)
    rows = w.rankings(20000, torch.Generator().manual_seed(0))
    p = w.prompts[0]
    top = [r["responses"][r["ranking"][0]] for r in rows]
    for y, t in zip(p.responses, p.truth, strict=True):
        share = top.count(y) / len(top)
        assert abs(share - t) < 4 * math.sqrt(t * (1 - t) / len(top)) + 1e-3


def test_write_load_and_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    w = small_world(n_demonstrations=50, n_comparisons=40, n_rankings=10)
    w.write(tmp_path / "w")
    assert World.load(tmp_path / "w").prompts == w.prompts
    assert len((tmp_path / "w" / "sft.jsonl").read_text().splitlines()) == 50
    first = read_jsonl(tmp_path / "w" / "comparisons.jsonl")[0]
    assert first["chosen"] != first["rejected"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "w" / "tokenizer")  # plain transformers
    p = w.prompts[0]
    ids = tok(p.prompt + p.responses[0], add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == 2 + p.words[0]
    assert (
        tok(p.prompt, add_special_tokens=False)["input_ids"]
        + tok(p.responses[0], add_special_tokens=False)["input_ids"]
        == ids
    )


def test_same_seed_same_world():
    assert small_world(seed=5).prompts == small_world(seed=5).prompts
    assert small_world(seed=5).prompts != small_world(seed=6).prompts


def test_a_world_made_with_other_settings_is_refused_not_reused(tmp_path):
    """A run asking for 12 prompts and seed 5 trained on the 3-prompt world already in its folder, while its
    config.yaml recorded 12 and 5. Settings left at their defaults take the folder's world."""
    from pmrlhf.data.world import ensure_world, resolve_world

    small = WorldConfig(n_prompts=3)
    ensure_world(tmp_path / "world", small)
    assert ensure_world(tmp_path / "world", small) == tmp_path / "world"  # the same settings: reused
    assert resolve_world(tmp_path / "world", WorldConfig()) == small  # no settings of its own: the folder's world
    with pytest.raises(ValueError, match=r"n_prompts = 3 \(asked: 12\), seed = 0 \(asked: 5\)"):
        ensure_world(tmp_path / "world", WorldConfig(n_prompts=12, seed=5))
    assert len(World.load(tmp_path / "world").prompts) == 3


def test_a_stage_records_the_world_it_used_and_refuses_another_before_writing(tmp_path):
    from typer.testing import CliRunner

    from pmrlhf.cli import app
    from pmrlhf.data.world import ensure_world

    ensure_world(tmp_path / "world", WorldConfig(n_prompts=3, n_comparisons=60, n_rankings=10))
    runner = CliRunner()
    refused = runner.invoke(app, ["rm", "--run-dir", str(tmp_path), "--set", "world.n_prompts=12"])
    assert refused.exit_code == 2 and "n_prompts = 3 (asked: 12)" in refused.output
    assert not (tmp_path / "reward").exists()
    import yaml

    done = runner.invoke(app, ["rm", "--run-dir", str(tmp_path), "--set", "optim.epochs=1"])
    assert done.exit_code == 0, done.output
    assert yaml.safe_load((tmp_path / "reward" / "config.yaml").read_text())["world"]["n_prompts"] == 3


def test_text_world_is_a_tree_of_long_answers_labelled_by_two_groups():
    """Answers of 8-40 words that share a prefix and part at a branching point, a reference that decides only at
    those points, and a population preference that is the groups' mixture, with the minority's favourite
    answer an answer the majority does not favour."""
    config = WorldConfig(kind="text", n_prompts=12, n_comparisons=20000)
    w = World.generate(config)
    for p in w.prompts:
        words = [r.split() for r in p.responses]
        assert all(8 <= len(x) <= 40 for x in words) and [len(x) for x in words] == p.words
        shared = len(os.path.commonprefix(words))
        assert shared >= config.segment_words  # the first segment is every answer's
        assert len({tuple(x) for x in words}) == len(words)
        assert all(a[: len(b)] != b for a in words for b in words if a is not b)  # no answer is another's prefix
        (share_maj, r_maj), (share_min, r_min) = p.groups
        mixture = share_maj * torch.softmax(torch.tensor(r_maj, dtype=torch.float64), -1) + share_min * torch.softmax(
            torch.tensor(r_min), -1
        )
        torch.testing.assert_close(mixture, torch.tensor(p.truth, dtype=torch.float64))
        torch.testing.assert_close(torch.softmax(torch.tensor(p.reward), -1), torch.tensor(p.truth))
        assert share_min == pytest.approx(1 / 11)
        assert p.minority[0] == int(torch.tensor(r_min).argmax()) != int(torch.tensor(r_maj).argmax())
    # Labels follow the mixture of the groups' BTL models: the share of wins of the minority's favourite over
    # each other answer is the groups' mixture of BTL probabilities, which r* alone would not give.
    p = w.prompts[0]
    wins, total = {}, {}
    for row in w.comparisons(config.n_comparisons, torch.Generator().manual_seed(1)):
        if row["prompt"] != p.prompt:
            continue
        c, r = p.responses.index(row["chosen"]), p.responses.index(row["rejected"])
        key = (min(c, r), max(c, r))
        total[key] = total.get(key, 0) + 1
        wins[key] = wins.get(key, 0) + (c == key[0])
    (share_maj, r_maj), (share_min, r_min) = p.groups
    for (a, b), n in total.items():
        expected = share_maj / (1 + math.exp(r_maj[b] - r_maj[a])) + share_min / (1 + math.exp(r_min[b] - r_min[a]))
        assert wins[(a, b)] / n == pytest.approx(expected, abs=4 * math.sqrt(0.25 / n))


def test_text_world_reference_decides_only_at_branching_points():
    """The demonstrators' next word given a prefix, under q, is certain everywhere but at the tree's branching
    points: at most k - 1 of an answer's 8-40 words are a choice, as most of an LM's tokens are near-certain."""
    w = World.generate(WorldConfig(kind="text", n_prompts=6))
    for p in w.prompts:
        words = [tuple(r.split()) for r in p.responses]
        for y in words:
            choices = 0
            for t in range(len(y)):
                below = sum(q for x, q in zip(words, p.ref, strict=True) if x[:t] == y[:t])
                here = sum(q for x, q in zip(words, p.ref, strict=True) if x[: t + 1] == y[: t + 1])
                choices += here < below - 1e-12
            assert 1 <= choices <= len(words) - 1


def test_the_learnable_target_is_the_truth_where_labels_are_btl_and_not_for_two_groups():
    """With one group and no label noise the labels are BTL in r*, and their fit is r* whatever the pair weights.
    With the study's text world (a minority of 1/11) the best single BTL fit under the world's pair weights gives
    the minority's answers 0.164 of M(x) where the truth gives 0.182, TV 0.040 on average."""
    from pmrlhf.evaluation.study import minority_share
    from pmrlhf.evaluation.truth import truth_over_m

    words = truth_over_m(World.generate(WorldConfig()))
    torch.testing.assert_close(words["learnable_reward"], words["reward"], atol=1e-9, rtol=0)
    world = World.generate(WorldConfig(kind="text", n_prompts=12, n_demonstrations=3000))
    text = truth_over_m(world)
    tv = 0.5 * (text["learnable"] - text["truth"]).abs().sum(-1)
    assert tv.mean().item() == pytest.approx(0.0403, abs=5e-4)
    assert minority_share(text["truth"].tolist(), world) == pytest.approx(0.1817, abs=5e-4)
    assert minority_share(text["learnable"].tolist(), world) == pytest.approx(0.1637, abs=5e-4)
    # the labels themselves: a mixture, not BTL in log(truth)
    r = text["reward"]
    btl_in_truth = torch.sigmoid(r[:, :, None] - r[:, None, :])
    assert (text["label_preference"] - btl_in_truth).abs().max().item() > 0.1
