"""Two processes (DDP, FSDP2 or DeepSpeed ZeRO-2, over gloo) split each global batch of the reward and DPO
stages: with half the batch per process they must train as one process does on the whole batch, and only one of
them writes."""

import math
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from helpers import model_weights, torchrun
from pmrlhf.config import ModelConfig, OptimConfig
from pmrlhf.data.sources import holdout
from pmrlhf.io import read_jsonl
from pmrlhf.stages import dpo, pipeline, reward, sft
from pmrlhf.training.setup import stage_accelerator


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_world_config):
    root = tmp_path_factory.mktemp("dist")
    sft.run(sft.SFTConfig(run_dir=str(root), world=tiny_world_config, optim=OptimConfig(lr=3e-3, epochs=2)))
    (root / "world.yaml").write_text(yaml.safe_dump({"world": asdict(tiny_world_config)}))
    return root


def _copy(run: Path, to: Path) -> Path:
    to.mkdir()
    for part in ("world", "sft", "world.yaml"):
        (shutil.copytree if (run / part).is_dir() else shutil.copy)(run / part, to / part)
    return to


def _two_processes(run: Path, stage: str, *overrides: str, backend: str = "ddp") -> None:
    sets = [a for o in overrides for a in ("--set", o)]
    result = torchrun(stage, "--config", str(run / "world.yaml"), "--run-dir", str(run), *sets, backend=backend)
    assert result.returncode == 0, result.stderr[-3000:]


def _assert_same_training(one: Path, two: Path, stage: str, metrics: list[str]) -> None:
    a, b = read_jsonl(one / stage / "metrics.jsonl"), read_jsonl(two / stage / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]  # one writer: no line twice
    assert all(any(k in r for r in a) for k in metrics)
    for ra, rb in zip(a, b, strict=True):
        for k in set(metrics) & ra.keys():
            assert ra[k] == pytest.approx(rb[k], abs=1e-5), (ra["step"], k)
    wa, wb = model_weights(one / stage / "model"), model_weights(two / stage / "model")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3


SFT_SETTINGS = ("optim.epochs=2", "optim.batch_size=32")


def _sft_on_two_processes(run: Path, tiny_world_config, backend: str) -> str:
    run.mkdir()
    (run / "world.yaml").write_text(yaml.safe_dump({"world": asdict(tiny_world_config)}))
    sets = [a for o in SFT_SETTINGS for a in ("--set", o)]
    result = torchrun("sft", "--config", str(run / "world.yaml"), "--run-dir", str(run), *sets, backend=backend)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1, result.stdout  # one process says where it wrote
    return result.stderr


@pytest.fixture(scope="module")
def ddp_sft(tmp_path_factory, tiny_world_config):
    run = tmp_path_factory.mktemp("sft") / "run"
    _sft_on_two_processes(run, tiny_world_config, "ddp")
    return run


def test_sft_on_two_processes_trains_on_shares_and_writes_once(ddp_sft):
    rows = read_jsonl(ddp_sft / "sft" / "metrics.jsonl")  # every line whole: one writer
    evals = [r for r in rows if "eval/loss" in r]
    demonstrations = holdout(read_jsonl(ddp_sft / "world" / "sft.jsonl"), 0.1)[0]
    per_epoch = math.ceil(len(demonstrations) / 64)  # 32 examples on each process per step
    assert sorted({r["step"] for r in evals}) == [per_epoch, 2 * per_epoch]  # each epoch's end, and the final
    assert evals[-1]["eval/loss"] < 0.9 * evals[0]["eval/loss"]
    assert model_weights(ddp_sft / "sft" / "model")


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_sft_under_fsdp_and_deepspeed_trains_as_under_ddp(ddp_sft, tmp_path, tiny_world_config, backend):
    """Under FSDP the saved model is gathered from the shards; under DeepSpeed the model is its own engine."""
    stderr = _sft_on_two_processes(tmp_path / "run", tiny_world_config, backend)
    prepared = {"fsdp": "prepared FSDPGPT2LMHeadModel", "deepspeed": "prepared DeepSpeedEngine"}[backend]
    assert stderr.count(prepared) == 2
    _assert_same_training(ddp_sft, tmp_path / "run", "sft", ["train/loss", "eval/loss"])


BACKENDS = pytest.mark.parametrize("backend", ["ddp", "fsdp", "deepspeed"])


@BACKENDS
def test_reward_model_on_two_processes_trains_as_on_one(sft_run, tmp_path, tiny_world_config, backend):
    """With two micro-batches per optimiser step (under DeepSpeed its engine accumulates them). Under FSDP the
    saved model is gathered from both processes' shards, as is the best state it goes back to."""
    one, two = _copy(sft_run, tmp_path / "one"), _copy(sft_run, tmp_path / "two")
    optim = OptimConfig(batch_size=16, epochs=1, grad_accum=2)
    reward.run(reward.RewardConfig(run_dir=str(one), world=tiny_world_config, optim=optim))
    _two_processes(two, "rm", "optim.batch_size=8", "optim.epochs=1", "optim.grad_accum=2", backend=backend)
    _assert_same_training(one, two, "reward", ["train/loss"])


def test_deepspeed_settings_that_contradict_the_stage_are_refused(sft_run, tmp_path):
    """DeepSpeed's engine clips and accumulates from its own config; accelerate would let it override the stage's
    max_grad_norm without a word."""
    run = _copy(sft_run, tmp_path / "run")
    sets = ["--set", "optim.max_grad_norm=1.0"]
    result = torchrun(
        "rm",
        "--config",
        str(run / "world.yaml"),
        "--run-dir",
        str(run),
        *sets,
        backend="deepspeed",
        env={"ACCELERATE_GRADIENT_CLIPPING": "0.5"},
    )
    assert result.returncode != 0
    assert "the DeepSpeed config sets gradient_clipping: 0.5, but this stage's config asks for 1.0" in result.stderr
    assert not (run / "reward" / "model").exists()


@BACKENDS
def test_dpo_on_two_processes_trains_as_on_one(sft_run, tmp_path, tiny_world_config, backend):
    """With a warm-up and cosine schedule, which the scheduler sets on the optimiser that DeepSpeed and FSDP wrap."""
    one, two = _copy(sft_run, tmp_path / "one"), _copy(sft_run, tmp_path / "two")
    schedule = dict(lr=3e-4, epochs=0.3, scheduler="cosine", warmup_ratio=0.2)
    dpo.run(dpo.DPOConfig(run_dir=str(one), world=tiny_world_config, optim=OptimConfig(batch_size=16, **schedule)))
    _two_processes(two, "dpo", "optim.batch_size=8", *(f"optim.{k}={v}" for k, v in schedule.items()), backend=backend)
    _assert_same_training(one, two, "dpo", ["train/loss", "train/accuracy", "train/margin", "train/lr"])


def test_ppo_refuses_prompts_that_do_not_split_evenly(sft_run, tmp_path):
    """Unequal shares can give processes unequal numbers of minibatches, and DDP would wait for ever."""
    run = _copy(sft_run, tmp_path / "run")
    result = torchrun(
        "ppo", "--config", str(run / "world.yaml"), "--run-dir", str(run), "--set", "prompts_per_iteration=5"
    )
    assert result.returncode != 0
    assert "prompts_per_iteration=5 must be a multiple of the number of processes, 2" in result.stderr


@pytest.mark.parametrize(
    "env, message",
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "ZeRO-3 is not supported"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "efficient_loading: true leaves"),
    ],
    ids=["zero3", "fsdp-rank0-loading"],
)
def test_launches_that_would_go_wrong_are_refused_before_any_work(env, message, monkeypatch, tmp_path):
    """What ``accelerate launch`` sets for these configs; a whole run stops before its first stage."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        pipeline.run(pipeline.PipelineConfig(run_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=message):
        stage_accelerator(ModelConfig(), micro_batch_size=8, max_grad_norm=1.0)


def test_every_stage_runs_in_one_launch_of_two_processes(tmp_path):
    """The quick demo's world and settings with one PPO and one DPO run, in one launch: both processes build the
    world at once, each stage reads what the one before wrote from the main process, and evaluation, probe and
    report run on the main process alone."""
    config = asdict(pipeline.demo_config(quick=True, run_dir=str(tmp_path / "run")))
    config["ppo"]["iterations"] = 40
    config["variants"] = [{"name": "ppo-pm", "penalty": "pm", "ent_ctl": 1.0}]
    config["dpo_variants"] = [{"name": "dpo-pm", "loss": "pm", "beta": 1.0}]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    result = torchrun("run", str(tmp_path / "run.yaml"), env={"COLUMNS": "1000"})  # no line wrapped
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("\nreport: ") == 1  # the summary, from one process
    assert result.stderr.count("world/comparisons.jsonl: ") == 2  # reward, dpo-pm: each said once, not twice
    assert (run / "report" / "report.md").is_file()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no folder left half-written
    for metrics in run.glob("*/metrics.jsonl"):
        steps = [r["step"] for r in read_jsonl(metrics)]
        assert steps == sorted(set(steps)), metrics  # one writer
