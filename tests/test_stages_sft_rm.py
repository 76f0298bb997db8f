import json
from dataclasses import asdict

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pmrlhf.cli import app
from pmrlhf.config import ModelConfig
from pmrlhf.data.world import World
from pmrlhf.evaluation.exact import rewards_over_m
from pmrlhf.evaluation.truth import truth_over_m
from pmrlhf.io import read_jsonl


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_world_config):
    """SFT then a reward model on a tiny world, through the command line with a YAML config, on two threads (the
    suite's processes run on one): the command would take one for tiny models, and the thread count changes the
    order of sums and so the run (this one's reward model agrees with at least 14 of the 18 true pairs on two
    threads, the bound below; 12 on one)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "2")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    run_dir = tmp_path_factory.mktemp("run")
    cfg = run_dir / "stage.yaml"
    cfg.write_text(yaml.safe_dump({"world": asdict(tiny_world_config), "optim": {"epochs": 6, "batch_size": 32}}))
    runner = CliRunner()
    sft = runner.invoke(app, ["sft", "--config", str(cfg), "--run-dir", str(run_dir), "--set", "optim.lr=3e-3"])
    assert sft.exit_code == 0, sft.output
    rm = runner.invoke(app, ["rm", "--config", str(cfg), "--run-dir", str(run_dir), "--set", "eval_every=20"])
    mp.undo()
    torch.set_num_threads(threads)
    assert rm.exit_code == 0, rm.output
    return run_dir


def test_stages_write_models_metrics_and_resolved_configs(pipeline):
    for stage in ("sft", "reward"):
        resolved = yaml.safe_load((pipeline / stage / "config.yaml").read_text())
        assert resolved["run_dir"] == str(pipeline) and resolved["world"]["n_prompts"] == 6
        rows = read_jsonl(pipeline / stage / "metrics.jsonl")
        assert rows and all("step" in r for r in rows)
        assert (pipeline / stage / "model" / "config.json").is_file()
    assert yaml.safe_load((pipeline / "sft" / "config.yaml").read_text())["optim"]["lr"] == 3e-3
    summary = json.loads((pipeline / "sft" / "summary.json").read_text())
    assert 1 < summary["eval_perplexity"] < 3  # a word-level world with 3 answers per prompt is easy


def test_reward_model_beats_chance_clearly_against_the_truth(pipeline):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    world = World.load(pipeline / "world")
    tok = AutoTokenizer.from_pretrained(pipeline / "reward" / "model")
    rm = AutoModelForSequenceClassification.from_pretrained(pipeline / "reward" / "model").eval()
    scores, mask = rewards_over_m(rm, tok, world)
    truth = truth_over_m(world)["reward"]
    agree = total = 0
    for i in range(len(world.prompts)):
        for a in range(3):
            for b in range(a + 1, 3):
                agree += int((scores[i, a] > scores[i, b]) == (truth[i, a] > truth[i, b]))
                total += 1
    assert agree / total >= 0.75
    summary = json.loads((pipeline / "reward" / "summary.json").read_text())
    assert summary["best"]["eval/accuracy"] > 0.6
    from pmrlhf.evaluation.truth import reward_model_gap
    from pmrlhf.models import load_reward_model, load_tokenizer

    tok = load_tokenizer(pipeline / "reward" / "model")
    model = load_reward_model(ModelConfig(), tok, pipeline / "reward" / "model", trainable=False)
    world = World.load(pipeline / "world")
    assert reward_model_gap(*rewards_over_m(model, tok, world), world)["pair_gap_to_truth"] < 0.2


def test_kwise_listwise_reward_model(pipeline):
    result = CliRunner().invoke(
        app,
        [
            "rm",
            "--run-dir",
            str(pipeline),
            "--set",
            "data_kind=ranking",
            "--set",
            "loss=listwise",
            "--set",
            "name=reward-listwise",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((pipeline / "reward-listwise" / "summary.json").read_text())
    assert summary["best"]["eval/accuracy"] > 0.6


def test_bad_config_and_bad_data_give_clear_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["sft", "--run-dir", str(tmp_path), "--set", "optim.learning_rate=1"])
    assert result.exit_code == 2 and "unknown config key(s) optim.learning_rate" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "response": ""}\n')
    result = runner.invoke(
        app,
        [
            "sft",
            "--run-dir",
            str(tmp_path),
            "--set",
            f"data.source={bad}",
            "--set",
            "model.name_or_path=gpt2-not-downloaded",
        ],
    )
    assert result.exit_code == 2 and "bad.jsonl: row 1: field 'response': is empty" in result.output


def test_reward_model_is_deterministic_given_the_seed(pipeline, tmp_path):
    import shutil

    shutil.copytree(pipeline / "world", tmp_path / "world")
    shutil.copytree(pipeline / "sft", tmp_path / "sft")
    args = ["rm", "--run-dir", str(tmp_path), "--set", "optim.epochs=0.3"]
    assert CliRunner().invoke(app, [*args, "--set", "name=r1"]).exit_code == 0
    assert CliRunner().invoke(app, [*args, "--set", "name=r2"]).exit_code == 0
    rows1 = read_jsonl(tmp_path / "r1" / "metrics.jsonl")
    rows2 = read_jsonl(tmp_path / "r2" / "metrics.jsonl")
    assert [r["train/loss"] for r in rows1] == [r["train/loss"] for r in rows2]
