import math

import pytest
import torch
from typer.testing import CliRunner

from pmrlhf.cli import app
from pmrlhf.evaluation.metrics import Samples, sec61_metrics
from pmrlhf.evaluation.probe import probe


def samples(logp1, logp2, ref1, ref2, r1, r2, len1, len2):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    n = len(logp1)
    return Samples([([1], [2])] * n, (t(logp1), t(logp2)), (t(ref1), t(ref2)), (t(r1), t(r2)), (t(len1), t(len2)))


def test_sec61_metrics_known_answers():
    # prompt 1: policy 0.75 / 0.25 between y1 and y2, reward model 0.5 / 0.5; prompt 2: both 0.5 / 0.5.
    s = samples(
        [math.log(0.75), -2.0],
        [math.log(0.25), -2.0],
        [-1.0, -1.0],
        [-1.0, -3.0],
        [1.0, 0.0],
        [1.0, 0.0],
        [2, 4],
        [1, 2],
    )
    summary, inst = sec61_metrics(s, beta=1.0)
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert inst["pm_divergence"] == pytest.approx([kl1, 0.0])
    assert summary["pm_divergence"] == pytest.approx(kl1 / 2)
    assert summary["length"] == pytest.approx((2 + 4 + 1 + 2) / 4)
    logp = [math.log(0.75), -2.0, math.log(0.25), -2.0]
    lengths = [2, 4, 1, 2]
    assert summary["perplexity"] == pytest.approx(
        sum(math.exp(-lp / n) for lp, n in zip(logp, lengths, strict=True)) / 4
    )
    assert summary["entropy"] == pytest.approx(-sum(logp) / 4)
    assert summary["kl"] == pytest.approx((sum(logp) - (-1 - 1 - 1 - 3)) / 4)
    # beta scales the reward model's preference: r / beta
    s2 = samples([0.0], [0.0], [0.0], [0.0], [0.2], [0.0], [1], [1])
    q = 1 / (1 + math.exp(-0.2 / 0.1))
    assert sec61_metrics(s2, beta=0.1)[0]["pm_divergence"] == pytest.approx(
        0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q))
    )


def test_probe_counts_collapse_by_length_difference():
    # p_ref: sigmoid(10) ~ 0.99995 (collapsed), sigmoid(0) = 0.5, sigmoid(-5) ~ 0.0067 (collapsed)
    s = samples(
        [0, 0, 0],
        [0, 0, 0],
        [0.0, -1.0, -6.0],
        [-10.0, -1.0, -1.0],
        [0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
        [5, 3, 1],
        [1, 3, 2],
    )
    summary, pairs = probe(s, beta=1.0)
    assert summary["collapse_rate"] == pytest.approx(2 / 3)
    assert summary["reward_collapse_rate"] == 0.0
    assert summary["collapse_rate_by_length_difference"] == {
        "0": {"pairs": 1, "collapse_rate": 0.0},
        "1": {"pairs": 1, "collapse_rate": 1.0},
        "4-7": {"pairs": 1, "collapse_rate": 1.0},
    }
    assert pairs["length_difference"] == [4.0, 0.0, 1.0]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(app, ["demo", "--quick", "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    return run, result.output


def test_quick_demo_writes_summary_report_and_figures(quick_demo):
    import json

    run, output = quick_demo
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert set(summary) == {"reference (SFT)", "ppo-kl", "ppo-pm", "ppo-cpm-0.3", "ppo-cpm-seq", "dpo", "dpo-pm"}
    for m in summary.values():
        assert {"pm_divergence", "length", "perplexity", "entropy", "kl"} <= set(m)
        exact = {"tv_to_truth", "tv_to_learnable", "tv_to_own_target", "mass_outside_m"}
        assert exact | {"pm_divergence_uniform_pairs", "pm_divergence_policy_pairs"} <= set(m["world"])
        # Def. 4.1's optimum at the run's own alpha, only for a run that has one (at alpha 0 it is PM's again)
        assert ("tv_to_cpm_target" in m["world"]) == bool(m["objective"].get("alpha"))
    # one group of labelers, no noise: the labels are BTL in r*, and what they teach is the truth itself
    assert summary["ppo-kl"]["world"]["learnable_tv_to_truth"] < 1e-6
    report = (run / "report" / "report.md").read_text()
    for fig in ("pm_divergence.png", "probe.png", "over_m.png"):
        assert f"]({fig})" in report and (run / "report" / fig).read_bytes()[:4] == b"\x89PNG"
    assert "| ppo-kl |" in report and "report:" in output


def test_quick_demo_shows_what_the_paper_says(quick_demo):
    import json

    run, _ = quick_demo
    s = json.loads((run / "eval" / "summary.json").read_text())
    kl, pm, cpm = s["ppo-kl"]["world"], s["ppo-pm"]["world"], s["ppo-cpm-0.3"]["world"]
    # KL RLHF sits at its biased closed form, not at the reward model's preferences.
    assert kl["tv_to_kl_target"] < 0.1 < kl["tv_to_reward_model"]
    # Unconditional PM leaves M(x); conditional PM stays in it.
    assert pm["mass_outside_m"] > 0.5 > cpm["mass_outside_m"]
    # DPO keeps the reference's bias; PM-DPO moves to the reward model's preferences.
    dpo, pm_dpo = s["dpo"]["world"], s["dpo-pm"]["world"]
    assert dpo["tv_to_kl_target"] < dpo["tv_to_reward_model"]
    assert pm_dpo["tv_to_reward_model"] < dpo["tv_to_reward_model"] - 0.1
    # The report says so of DPO under the reward it optimised: its labels' fit, not the reward model it never saw.
    assert dpo["tv_to_own_target"] < dpo["tv_to_learnable"]
    assert (
        f"(dpo): its preferences over M(x) are at total variation {dpo['tv_to_own_target']:.3f} from its closed form "
        f"ref·e^(r/β) (eq. 5.1) and {dpo['tv_to_learnable']:.3f} from e^r, with r the Bradley–Terry fit of its "
        "comparisons' labels" in (run / "report" / "report.md").read_text()
    )


def test_sft_reference_is_near_0_or_1_on_many_pairs(quick_demo):
    """Sec. 5.2 / Fig. 3a: the SFT reference's pairwise preferences over M(x) sit near 0 or 1 for a good share."""
    import itertools

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pmrlhf.data.world import World
    from pmrlhf.evaluation.exact import policy_over_m

    run, _ = quick_demo
    tok = AutoTokenizer.from_pretrained(run / "sft" / "model")
    model = AutoModelForCausalLM.from_pretrained(run / "sft" / "model").eval()
    p = policy_over_m(model, tok, World.load(run / "world")).logp.exp()
    prefs = torch.tensor(
        [
            (p[i, a] / (p[i, a] + p[i, b])).item()
            for i in range(p.shape[0])
            for a, b in itertools.combinations(range(p.shape[1]), 2)
        ]
    )
    assert ((prefs <= 0.05) | (prefs >= 0.95)).float().mean() >= 0.25


def test_pipeline_reuses_finished_stages(quick_demo):
    run, _ = quick_demo
    stamp = (run / "sft" / "model" / "model.safetensors").stat().st_mtime_ns
    result = CliRunner().invoke(app, ["demo", "--quick", "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert "already done" in result.output
    assert (run / "sft" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
