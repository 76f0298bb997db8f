"""A run that meets a NaN or inf stops with a message naming the stage, the step and the quantity, exits 1 and
writes no model (it exited 0 with all-NaN weights before)."""

import dataclasses
import os

import pytest
import torch
import yaml
from typer.testing import CliRunner

from helpers import copy_run, ppo_config
from pmrlhf.cli import app
from pmrlhf.stages import ppo
from pmrlhf.training.guards import NonFiniteError, check_finite


def test_check_finite_names_where_what_and_why():
    check_finite("x: step 3", "the loss", torch.tensor(1.0))
    with pytest.raises(NonFiniteError, match=r"x: step 3: the loss is not finite \(nan\); likely cause: a lr"):
        check_finite("x: step 3", "the loss", torch.tensor(float("nan")), "a lr")
    with pytest.raises(NonFiniteError, match="2 of 3 values"):
        check_finite("x", "a score", torch.tensor([1.0, float("inf"), float("-inf")]))


@pytest.mark.parametrize("stage,name", [("sft", "sft"), ("rm", "reward"), ("dpo", "dpo")])
def test_an_overflowing_learning_rate_stops_the_stage_and_saves_nothing(
    trained, tmp_path, tiny_world_config, stage, name
):
    copy_run(trained, tmp_path, [part for part in ("world", "sft", "reward") if part != name])
    cfg = tmp_path / "stage.yaml"
    cfg.write_text(yaml.safe_dump({"world": dataclasses.asdict(tiny_world_config)}))
    result = CliRunner().invoke(
        app, [stage, "--config", str(cfg), "--run-dir", str(tmp_path), "--set", "optim.lr=1e30"]
    )
    assert result.exit_code == 1, result.output
    assert "is not finite" in result.output and "step" in result.output
    assert not (tmp_path / name / "model").exists() and not (tmp_path / name / "summary.json").exists()


@pytest.mark.parametrize("stage,name", [("rm", "reward"), ("dpo", "dpo")])
def test_weights_spoilt_by_the_last_step_are_never_saved(trained, tmp_path, tiny_world_config, stage, name):
    """One optimiser step (the whole portion in one batch) at a finite but overflowing lr: its loss was finite,
    no later step looked at the weights, and every weight NaN was saved as the stage's model."""
    copy_run(trained, tmp_path, [part for part in ("world", "sft", "reward") if part != name])
    cfg = tmp_path / "stage.yaml"
    cfg.write_text(yaml.safe_dump({"world": dataclasses.asdict(tiny_world_config)}))
    overrides = ["--set", "optim.lr=1e39", "--set", "optim.batch_size=100000", "--set", "optim.epochs=1"]
    result = CliRunner().invoke(app, [stage, "--config", str(cfg), "--run-dir", str(tmp_path), *overrides])
    assert result.exit_code == 1, result.output
    assert f"{name}: the model to save: weight" in result.output and "is not finite" in result.output, result.output
    assert not (tmp_path / name / "model").exists()


def test_a_reward_model_that_scores_nan_stops_ppo_before_any_update(trained, tmp_path, tiny_world_config):
    copy_run(trained, tmp_path)
    weights = tmp_path / "reward" / "model" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    state["score.weight"] = torch.full_like(state["score.weight"], float("nan"))
    save_file(state, str(weights))
    cfg = ppo_config(tmp_path, tiny_world_config, iterations=2)
    with pytest.raises(NonFiniteError, match="ppo: iteration 1: a reward-model score is not finite"):
        ppo.run(cfg)
    assert not (tmp_path / "ppo" / "model").exists()


@pytest.mark.parametrize("stage,extra", [("rm", []), ("dpo", ["--set", "loss=pm"]), ("ppo", ["--set", "iterations=1"])])
def test_a_stage_left_with_no_data_says_why_instead_of_spinning(trained, tmp_path, tiny_world_config, stage, extra):
    """Every prompt longer than max_prompt_tokens and skipped: the reward stage and PM-DPO looped forever."""
    copy_run(trained, tmp_path)
    cfg = tmp_path / "stage.yaml"
    cfg.write_text(yaml.safe_dump({"world": dataclasses.asdict(tiny_world_config)}))
    overrides = ["--set", "data.max_prompt_tokens=1", "--set", "data.prompt_overflow=skip", *extra]
    result = CliRunner().invoke(app, [stage, "--config", str(cfg), "--run-dir", str(tmp_path), *overrides])
    assert result.exit_code == 2, result.output  # the data given cannot work: an input error
    assert "no examples left to train on" in result.output and "prompts skipped (too long)" in result.output
    assert "raise data.max_prompt_tokens" in result.output


def test_a_failed_rerun_leaves_the_finished_stage_as_it_was(trained, tmp_path, tiny_world_config):
    """A rerun over a finished stage wrote config.yaml and metrics.jsonl at once and the model and summary at the
    end: killed or failed in between, the folder described one run and held another, and `pmrlhf run` reused it.
    Now a stage writes into <name>.partial/ and swaps it in whole when it is done."""
    import hashlib

    copy_run(trained, tmp_path)

    def digest(folder):
        return {
            p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
        }

    before = digest(tmp_path / "reward")
    cfg = tmp_path / "stage.yaml"
    cfg.write_text(yaml.safe_dump({"world": dataclasses.asdict(tiny_world_config)}))
    result = CliRunner().invoke(
        app, ["rm", "--config", str(cfg), "--run-dir", str(tmp_path), "--set", "optim.lr=1e30", "--set", "seed=3"]
    )
    assert result.exit_code == 1, result.output
    assert digest(tmp_path / "reward") == before
    assert (tmp_path / "reward.partial" / "config.yaml").is_file()  # what the failed run got to write
    from pmrlhf.stages.pipeline import _done

    assert _done(tmp_path, "reward")


def test_a_second_process_on_a_stage_in_use_is_refused_and_a_dead_ones_lock_taken_over(
    trained, tmp_path, tiny_world_config
):
    """Two `pmrlhf rm` on one run folder a second apart both printed "wrote", and one's result was lost: now the
    second is refused while the first holds ``reward.lock``, and the first finishes whole."""
    import subprocess
    import sys
    import time

    copy_run(trained, tmp_path, ["world", "sft"])
    cfg = tmp_path / "stage.yaml"
    cfg.write_text(yaml.safe_dump({"world": dataclasses.asdict(tiny_world_config)}))
    args = ["rm", "--config", str(cfg), "--run-dir", str(tmp_path)]
    first = subprocess.Popen([sys.executable, "-m", "pmrlhf", *args, "--set", "seed=1"], stderr=subprocess.PIPE)
    lock = tmp_path / "reward.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.exists(), first.stderr.read().decode()
    second = CliRunner().invoke(app, [*args, "--set", "seed=2"])
    assert second.exit_code == 2, second.output
    assert f"is being written by another process (pid {first.pid}" in second.output
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()
    assert yaml.safe_load((tmp_path / "reward" / "config.yaml").read_text())["seed"] == 1
    assert not lock.exists()
    # a lock left by a process that was killed is taken over
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(f"{gone.pid} {__import__('socket').gethostname()}\n")
    again = CliRunner().invoke(app, [*args, "--set", "seed=3", "--set", "optim.epochs=0.1"])
    assert again.exit_code == 0, again.output
    assert yaml.safe_load((tmp_path / "reward" / "config.yaml").read_text())["seed"] == 3


def test_replace_dir_swaps_in_one_step_where_the_file_system_can(tmp_path, monkeypatch):
    """renameat2(RENAME_EXCHANGE): at no instant is there no folder at the path (two renames leave a gap)."""
    import os

    from pmrlhf import io

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "w").write_text("new")
    if not io._exchange(tmp_path / "new", tmp_path / "model"):
        pytest.skip("this file system cannot exchange names")
    io._exchange(tmp_path / "new", tmp_path / "model")  # and back
    renames = []
    monkeypatch.setattr(os, "replace", lambda *a: renames.append(a))  # the two-rename path must not run
    io.replace_dir(tmp_path / "new", tmp_path / "model")
    assert renames == [] and (tmp_path / "model" / "w").read_text() == "new" and not (tmp_path / "new").exists()


def test_replace_dir_without_exchange_keeps_the_old_folder_if_killed_between_renames(tmp_path, monkeypatch):
    import os

    from pmrlhf import io

    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w").write_text("old")
    (tmp_path / "new").mkdir()
    calls = []
    real = os.replace

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between the two renames
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        io.replace_dir(tmp_path / "new", tmp_path / "model")
    kept = list(tmp_path.glob(".model.old.*"))
    assert len(kept) == 1 and (kept[0] / "w").read_text() == "old"


@pytest.mark.parametrize("stage,name", [("sft", "sft"), ("rm", "reward"), ("dpo", "dpo")])
def test_every_training_stage_resumes_after_sigkill_as_if_never_stopped(
    trained, tmp_path, tiny_world_config, stage, name
):
    """Killed after a checkpoint and resumed with --resume: the same weights, bit for bit, and the same metrics."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import model_weights
    from pmrlhf.io import read_jsonl

    cfg = tmp_path / "stage.yaml"
    cfg.write_text(yaml.safe_dump({"world": dataclasses.asdict(tiny_world_config)}))
    args = [stage, "--config", str(cfg), "--set", "checkpoint_every=5", "--set", "optim.epochs=6"]
    args += ["--set", "logging.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # thread count fixes the order of float reductions

    def launch(run, *extra):
        cmd = [sys.executable, "-m", "pmrlhf", *args, "--run-dir", str(run), *extra]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    runs = {}
    for kind in ("straight", "killed"):
        runs[kind] = tmp_path / kind
        copy_run(trained, runs[kind], [part for part in ("world", "sft", "reward") if part != name])
    assert launch(runs["straight"]).wait() == 0
    proc = launch(runs["killed"])
    ckpt = runs["killed"] / f"{name}.partial" / "checkpoints"
    second = "step-000010"
    deadline = time.time() + 120
    while not any(ckpt.glob(second)):
        assert proc.poll() is None and time.time() < deadline, "run ended before its second checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (runs["killed"] / name / "model").exists()
    resumed = launch(runs["killed"], "--resume")
    _, err = resumed.communicate()
    assert resumed.returncode == 0, err.decode()[-2000:]
    assert "resumed" in err.decode()
    a, b = model_weights(runs["straight"] / name / "model"), model_weights(runs["killed"] / name / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = ("time", "runtime", "per_second")  # wall-clock figures differ between any two runs
    untimed = lambda rows: [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rows]  # noqa: E731
    straight = untimed(read_jsonl(runs["straight"] / name / "metrics.jsonl"))
    assert untimed(read_jsonl(runs["killed"] / name / "metrics.jsonl")) == straight and len(straight) > 10


def test_a_pipeline_killed_in_a_stage_continues_that_stage_with_resume(tmp_path):
    """`pmrlhf run --resume` (and `pmrlhf demo --resume`) reuses the finished stages and continues the one it was
    killed in from its newest checkpoint: the quick demo with one PPO run of 100 iterations."""
    import dataclasses
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from pmrlhf.stages import pipeline

    run = tmp_path / "run"
    config = dataclasses.asdict(pipeline.demo_config(quick=True, run_dir=str(run)))
    config["ppo"]["iterations"] = 100
    config["variants"], config["dpo_variants"] = config["variants"][:1], []
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "pmrlhf", "run", str(tmp_path / "run.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not any((run / "ppo-kl.partial" / "checkpoints").glob("iter-000050")):
        assert proc.poll() is None and time.time() < deadline, "the demo ended before its PPO checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    out = again.stdout + again.stderr
    assert "sft: already done" in out and "resumed ppo-kl at iteration 50" in out
    assert (run / "report" / "report.md").is_file() and not (run / "ppo-kl.partial").exists()
