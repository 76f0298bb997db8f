"""``pmrlhf sweep`` and the study it writes: intervals and paired differences recomputed from the seeds' own
evaluations, a sweep that continues without retraining, and the shipped study configs' quick forms end to end."""

import json
import math
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pmrlhf.cli import app
from pmrlhf.config import load_config
from pmrlhf.data.world import World, WorldConfig
from pmrlhf.evaluation import study
from pmrlhf.stages.sweep import SweepConfig

CONFIGS = Path(__file__).parent.parent / "configs" / "study"


def test_interval_is_the_t_interval_of_the_mean():
    """[1, 2, 3]: mean 2, standard deviation 1, and with 2 degrees of freedom t's quantile has the closed form
    ``t(0.975, 2) = 0.95 sqrt(2 / (1 - 0.95^2)) = 4.3027``, so the half-width is that over sqrt(3)."""
    i = study.Interval.of([1.0, 2.0, 3.0])
    assert (i.mean, i.n) == (2.0, 3)
    assert i.half == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)) / math.sqrt(3), abs=1e-9)
    assert not i.excludes_zero()
    assert study.Interval.of([1.0, 1.1, 0.9, 1.0, 1.05]).excludes_zero()
    assert study.Interval.of([0.5, math.nan]) == study.Interval(0.5, 0.0, 1)  # a seed without the metric
    assert study.Interval.of([]).n == 0 and str(study.Interval.of([])) == "n/a"


def test_pareto_front_keeps_the_points_nothing_beats_on_both():
    points = {"a": (0.0, 1.0), "b": (0.1, 0.5), "c": (0.2, 0.6), "d": (0.5, 0.1), "e": (0.5, 0.2)}
    assert study.pareto_front(points) == ["a", "b", "d"]


def test_minority_share_of_the_truth_is_the_minority_answers_true_share():
    world = World.generate(WorldConfig(kind="text", n_prompts=4))
    truth = [p.truth for p in world.prompts]
    expected = statistics.fmean(p.truth[p.minority[0]] for p in world.prompts)
    assert study.minority_share(truth, world) == pytest.approx(expected)
    words = World.generate(WorldConfig(n_prompts=6))  # only the minority profile has a minority answer
    assert study.minority_share([p.truth for p in words.prompts], words) == pytest.approx(
        statistics.fmean(p.truth[p.minority[0]] for p in words.prompts if p.profile == "minority")
    )


def test_grid_expands_one_swept_setting_per_entry():
    cfg = SweepConfig(
        grid=[
            {"name": "kl", "penalty": "kl"},
            {"name": "m", "penalty": "cpm_mean", "alpha_ctl": [0.5, 0.75]},
            {"name": "p", "penalty": ["pm", "maxent"]},  # names, not numbers, are swept too
        ]
    )
    assert [v["name"] for v in cfg.variants()] == ["kl", "m-0.5", "m-0.75", "p-pm", "p-maxent"]
    assert cfg.variants()[4]["penalty"] == "maxent"
    assert cfg.variants()[2]["alpha_ctl"] == 0.75
    seed = cfg.seed_config(3)
    assert (seed.seed, seed.run_dir, [v["name"] for v in seed.variants]) == (
        3,
        "runs/study/seed3",
        ["kl", "m-0.5", "m-0.75", "p-pm", "p-maxent"],
    )
    # only: a grid entry's name keeps all its values, a swept name that one
    cfg.only = ["m", "p-maxent"]
    cfg.validate()
    assert [v["name"] for v in cfg.seed_config(0).variants] == ["m-0.5", "m-0.75", "p-maxent"]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"grid": []}, "grid is empty"),
        ({"grid": [{"name": "a", "penalty": "kl"}, {"name": "a", "loss": "pm"}]}, "names a method twice"),
        ({"grid": [{"name": "a", "penalty": "kl", "beta": [1, 2], "kl_ctl": [1, 2]}]}, "one setting per entry"),
        ({"seeds": [1, 1]}, "distinct"),
        ({"pipeline": {"variants": []}}, "set by the sweep"),
        ({"only": ["a-1"]}, "only names no method of the grid: \\['a-1'\\]"),
    ],
)
def test_sweep_config_refuses_what_it_cannot_run(change, message):
    cfg = SweepConfig(**{"grid": [{"name": "a", "penalty": "kl"}], **change})
    with pytest.raises(ValueError, match=message):
        cfg.validate()


@pytest.fixture(scope="module")
def words_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "words"
    result = CliRunner().invoke(
        app, ["sweep", str(CONFIGS / "words.yaml"), "--quick", "--set", f"quick.sweep_dir={out}"]
    )
    assert result.exit_code == 0, result.output
    return out


def test_study_intervals_and_differences_are_those_of_the_seeds_evaluations(words_quick):
    cfg = load_config(SweepConfig, CONFIGS / "words.yaml").quick_form()
    data = json.loads((words_quick / "study" / "study.json").read_text())
    summaries = {s: json.loads((words_quick / f"seed{s}" / "eval" / "summary.json").read_text()) for s in cfg.seeds}
    assert data["seeds"] == cfg.seeds == [0, 1]
    assert set(data["methods"]) == {
        "reference (SFT)",
        "reward model",
        "ground truth",
        "learnable target",
        *(v["name"] for v in cfg.variants()),
    }
    for name, row in data["methods"].items():
        if name in ("reward model", "ground truth", "learnable target"):
            continue
        for key in ("pm_divergence_uniform_pairs", "mass_outside_m", "tv_to_truth", "tv_to_learnable"):
            values = [summaries[s][name]["world"][key] for s in cfg.seeds]
            half = math.tan(0.475 * math.pi) * statistics.stdev(values) / math.sqrt(2)  # t(0.975, 1 df)
            assert row["intervals"][key]["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
            assert row["intervals"][key]["half"] == pytest.approx(half, abs=1e-12)
        sampled = [summaries[s][name]["pm_divergence"] for s in cfg.seeds]  # the paper's metric, beside the exact
        assert row["intervals"]["pm_divergence_sampled"]["mean"] == pytest.approx(statistics.fmean(sampled))
    kl = [summaries[s]["ppo-kl"]["world"]["pm_divergence_uniform_pairs"] for s in cfg.seeds]
    cpm = [summaries[s]["ppo-cpm-prefix-0.01"]["world"]["pm_divergence_uniform_pairs"] for s in cfg.seeds]
    diff = data["methods"]["ppo-cpm-prefix-0.01"]["differences"]["pm_divergence_uniform_pairs"]
    assert diff["mean"] == pytest.approx(statistics.fmean(c - k for c, k in zip(cpm, kl, strict=True)), abs=1e-12)
    assert data["methods"]["dpo-pm"]["baseline"] == "dpo"
    # the seeds train anew on one world: the same truth, different policies
    assert (words_quick / "seed0" / "world" / "truth.json").read_text() == (
        words_quick / "seed1" / "world" / "truth.json"
    ).read_text()
    assert kl[0] != kl[1]
    own = data["methods"]["ppo-cpm-prefix-0.1"]["values"]["own_target_mass_outside_m"]
    assert all(0 <= v <= 1 for v in own)  # eval estimated the rule's own optimum off M(x)
    text = (words_quick / "study" / "study.md").read_text()
    assert "| ppo-cpm-prefix-0.1 |" in text and "## Against the target" in text
    assert "| sampled PM divergence |" in text and "| Δ sampled PM divergence vs baseline |" in text
    for figure in ("pm_divergence_vs_alpha", "tradeoff", "minority"):
        assert (words_quick / "study" / f"{figure}.png").stat().st_size > 10_000


def test_a_sweep_run_again_reuses_every_trained_model(words_quick):
    models = sorted((words_quick).glob("seed*/*/model/*"))
    before = {p: p.stat().st_mtime_ns for p in models}
    table = (words_quick / "study" / "study.json").read_text()
    result = CliRunner().invoke(
        app, ["sweep", str(CONFIGS / "words.yaml"), "--quick", "--set", f"quick.sweep_dir={words_quick}"]
    )
    assert result.exit_code == 0, result.output
    assert "already done" in result.output
    assert {p: p.stat().st_mtime_ns for p in models} == before
    assert (words_quick / "study" / "study.json").read_text() == table


def test_a_finished_method_whose_settings_changed_is_not_reused(words_quick):
    """The sweep reported the old run under a changed coefficient: now the differing setting is named, before
    anything is written or trained."""
    from pmrlhf.config import InputError
    from pmrlhf.stages import pipeline

    cfg = load_config(SweepConfig, CONFIGS / "words.yaml").quick_form()
    cfg.sweep_dir = str(words_quick)
    seed = cfg.seed_config(cfg.seeds[0])
    kl = next(v for v in seed.variants if v["name"] == "ppo-kl")
    kl["kl_ctl"] = 0.2
    run_config = (Path(seed.run_dir) / "config.yaml").read_text()
    with pytest.raises(InputError, match=r"ppo-kl: .* was trained with other settings \(penalty.coef = 1.0 there, 0.2"):
        pipeline.run(seed)
    assert (Path(seed.run_dir) / "config.yaml").read_text() == run_config


def test_a_setting_added_since_a_run_was_recorded_matches_at_its_default():
    """A reward model trained before ``groups`` existed is reused where groups is asked at 1, not at 2."""
    from pmrlhf.training.checkpoints import differences

    saved = {"optim": {"lr": 1e-3}}
    defaults = {"optim": {"lr": 1e-3}, "groups": 1}
    assert differences(saved, {"optim": {"lr": 1e-3}, "groups": 1}, (), defaults) == []
    assert differences(saved, {"optim": {"lr": 1e-3}, "groups": 2}, (), defaults) == ["groups = None there, 2 here"]
    assert differences(saved, {"optim": {"lr": 1e-3}, "groups": 1}, ()) == ["groups = None there, 1 here"]


def test_text_study_quick_form_runs_end_to_end(tmp_path):
    """The text-like world through SFT, reward model, PPO with the length-normalised rule, PM-DPO and eval."""
    out = tmp_path / "text"
    result = CliRunner().invoke(
        app, ["sweep", str(CONFIGS / "text.yaml"), "--quick", "--set", f"quick.sweep_dir={out}"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "study" / "study.json").read_text())
    assert data["methods"]["ppo-cpm-mean-0.8"]["objective"]["penalty"] == "cpm_mean"
    truth = data["methods"]["ground truth"]["intervals"]["minority_share"]
    assert 0 < truth["mean"] < 0.5 and truth["half"] == 0  # one world: its truth has no spread


@pytest.mark.parametrize(
    "df,quantile",
    [
        (1, math.tan(0.475 * math.pi)),
        (2, 4.302652729911275),
        (4, 2.776445105197793),
        (30, 2.042272456301238),
        (31, 2.039513446396408),
        (100, 1.983971518523552),
    ],
)
def test_t_quantiles_are_exact_beyond_the_old_table(df, quantile):
    """Known values of Student's t; beyond 30 degrees of freedom the table fell back to 1.96 (3.9 % too narrow
    at 31)."""
    assert study.t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-9)


@pytest.mark.parametrize(
    "path", [*sorted(CONFIGS.glob("*.yaml")), CONFIGS.parent / "realtext.yaml"], ids=lambda p: p.stem
)
def test_every_study_config_gives_a_valid_pipeline_for_each_seed(path):
    cfg = load_config(SweepConfig, path)
    cfg.validate()
    for seed in cfg.seeds:
        stages = cfg.seed_config(seed).stage_configs()
        assert {v["name"] for v in cfg.variants()} <= set(stages)


def test_the_alpha_figure_takes_one_rule_at_one_alpha_twice(tmp_path):
    """Two runs of a rule at the same alpha (of other lengths, say) are two points, not a failed comparison."""
    from pmrlhf.evaluation.study import Interval, plot_alpha

    def row(mean: float, **objective) -> dict:
        return {"objective": objective, "intervals": {"pm_divergence_uniform_pairs": Interval.of([mean, mean])}}

    prefix = dict(method="ppo", penalty="cpm_prefix", alpha=0.01)
    methods = {"ppo-kl": row(0.3, method="ppo", penalty="kl"), "a": row(0.2, **prefix), "b": row(0.1, **prefix)}
    for name in ("a", "b"):
        methods[name]["differences"] = {}
    assert plot_alpha({"methods": methods}, tmp_path / "alpha.png").stat().st_size > 5_000
