"""Faults of the machine rather than of the input: a real full disk, a read-only folder, a run stopped by a
signal. Each ends in one line saying what happened and where the state is, and leaves nothing half-written."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pmrlhf.cli import app
from pmrlhf.io import read_jsonl


@pytest.fixture
def disk(tmp_path):
    """``disk(size, read_only=False)``: a folder on a file system of its own of ``size`` (a tmpfs), unmounted after
    the test; skipped where this process may not mount one."""
    mounted = []

    def make(size: str, read_only: bool = False) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a small file system here: {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:  # lazily: a failed run's traceback may still map a model file of it
        subprocess.run(["umount", "--lazy", str(folder)], check=False)


def test_a_world_on_a_full_disk_is_one_line_and_leaves_nothing(disk):
    folder = disk("60k")
    result = CliRunner().invoke(app, ["world", "--out", str(folder / "w"), "--set", "n_demonstrations=3000"])
    assert result.exit_code == 1, result.output
    assert f"no space left on the device under {folder / 'w'}: free space on it, or choose another --out" in (
        result.output.replace("\n", "")
    )
    assert list(folder.iterdir()) == []


def test_a_checkpoint_on_a_full_disk_keeps_the_earlier_ones(disk, trained, tiny_world_config):
    """torch's writer says only "unexpected pos" when the disk fills: the disk's free space tells it apart."""
    from pmrlhf.stages import reward

    run = disk("3m")
    shutil.copytree(trained / "world", run / "world")
    shutil.copytree(trained / "sft" / "model", run / "sft" / "model")
    config = reward.RewardConfig(run_dir=str(run), world=tiny_world_config, checkpoint_every=5, keep_checkpoints=1)
    with pytest.raises(ValueError, match="no space left on the device while writing checkpoint step-000010"):
        reward.run(config)
    checkpoints = run / "reward.partial" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-000005"]  # the unfinished one removed


def test_a_model_on_a_full_disk_is_one_line(disk, trained, tiny_world_config):
    run = disk("900k")
    shutil.copytree(trained / "world", run / "world")
    shutil.copytree(trained / "sft" / "model", run / "sft" / "model")
    settings = [f"world.{k}={v}" for k, v in tiny_world_config.__dict__.items()] + ["checkpoint_every=0"]
    result = CliRunner().invoke(app, ["rm", "--run-dir", str(run), *[a for s in settings for a in ("--set", s)]])
    assert result.exit_code == 1, result.output
    assert f"no space left on the device under {run}" in result.output.replace("\n", "")
    assert not (run / "reward").exists() and not list((run / "reward.partial").glob("**/*.safetensors"))


@pytest.mark.parametrize("command", ["world", "theory"])
def test_a_read_only_output_folder_is_one_line(disk, command):
    folder = disk("1m", read_only=True)
    result = CliRunner().invoke(app, [command, "--out", str(folder / "out")])
    assert result.exit_code == 2, result.output
    assert "Read-only file system; choose a writable --out" in result.output.replace("\n", "")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_stage_says_where_its_state_is_and_resumes(trained, tmp_path, tiny_world_config, signum):
    shutil.copytree(trained / "world", tmp_path / "world")
    shutil.copytree(trained / "sft" / "model", tmp_path / "sft" / "model")
    settings = [f"world.{k}={v}" for k, v in tiny_world_config.__dict__.items()] + ["checkpoint_every=5"]
    args = [
        sys.executable,
        "-m",
        "pmrlhf",
        "rm",
        "--run-dir",
        str(tmp_path),
        *[a for s in settings for a in ("--set", s)],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_as_from_a_shell
    )
    checkpoints = tmp_path / "reward.partial" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:  # how the command takes signals, for the message below: SigIgn, SigBlk and SigCgt are bit masks
        taken = [x for x in Path(f"/proc/{process.pid}/status").read_text().splitlines() if x.startswith("Sig")]
    except OSError:
        taken = ["finished before a checkpoint was seen"]
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, f"{taken}\n{err}"
    assert (
        f"stopped: the checkpoints written so far are kept under {tmp_path / 'reward.partial'}; the same command "
        "with --resume continues" in err.replace("\n", "")
    )
    assert "Traceback" not in err
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed reward at step" in resumed.stderr


def _as_from_a_shell() -> None:
    """SIGINT taken and unblocked, as a shell starts a command, whatever the test process inherited: an ignored
    signal passes to a child, and under pytest-xdist the command once ran to its end through a SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _cli_settings(world, **extra) -> list[str]:
    settings = {**{f"world.{k}": v for k, v in world.__dict__.items()}, **extra}
    return [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, trained, tiny_world_config):
    """A run whose reward model kept its checkpoints (every 5 steps), to spoil one way at a time."""
    from pmrlhf.stages import reward

    run = tmp_path_factory.mktemp("finished")
    shutil.copytree(trained / "world", run / "world")
    shutil.copytree(trained / "sft", run / "sft")
    reward.run(reward.RewardConfig(run_dir=str(run), world=tiny_world_config, checkpoint_every=5))
    return run


def _unfinished(finished: Path, tmp: Path, stage: str) -> tuple[Path, list[Path]]:
    """A copy of ``finished`` whose ``stage`` was stopped after its last checkpoint: (run, its checkpoints)."""
    shutil.copytree(finished, tmp / "run")
    (tmp / "run" / stage).rename(tmp / "run" / f"{stage}.partial")
    return tmp / "run", sorted((tmp / "run" / f"{stage}.partial" / "checkpoints").iterdir())


def _cut(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


SPOILT = [
    ("state.pt", lambda c: (c / "state.pt").write_bytes(b"garbage"), "state.pt cannot be read (UnpicklingError"),
    ("empty optimizer", lambda c: (c / "optimizer.bin").write_bytes(b""), "optimizer.bin cannot be read (EOFError"),
    ("cut optimizer", lambda c: _cut(c / "optimizer.bin"), "optimizer.bin cannot be read (RuntimeError"),
    ("cut weights", lambda c: _cut(c / "pytorch_model.bin"), "pytorch_model.bin cannot be read (RuntimeError"),
    ("no best model", lambda c: (c / "best_0.pt").unlink(), "best_0.pt cannot be read (missing)"),
]


@pytest.mark.parametrize("what,spoil,message", SPOILT, ids=[s[0] for s in SPOILT])
def test_a_spoilt_checkpoint_is_named_with_what_to_do(finished, tmp_path, tiny_world_config, what, spoil, message):
    run, found = _unfinished(finished, tmp_path, "reward")
    spoil(found[-1])
    args = ["rm", "--run-dir", str(run), "--resume", *_cli_settings(tiny_world_config, checkpoint_every=5)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    text = result.output.replace("\n", "")
    assert f"{found[-1]}: {message}" in text and f"remove {found[-1]} to resume from the checkpoint before it" in text


def test_an_empty_newest_checkpoint_falls_back_to_the_one_before(finished, tmp_path, tiny_world_config):
    run, found = _unfinished(finished, tmp_path, "reward")
    (found[-1].parent / "step-999999").mkdir()
    args = ["rm", "--run-dir", str(run), "--resume", *_cli_settings(tiny_world_config, checkpoint_every=5)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # rich wraps lines at a space, which it drops, or inside a path: compared without any white space
    said = "".join(result.output.split())
    assert "isnotawholecheckpoint(nostate.pt):usingtheonebefore" in said
    assert f"resumedrewardatstep{int(found[-1].name[5:])}" in said


def test_a_metrics_line_cut_short_does_not_block_resuming(finished, tmp_path, tiny_world_config):
    """A run killed while writing a line leaves it half-written; the line before is kept, the half one dropped."""
    run, found = _unfinished(finished, tmp_path, "reward")
    metrics = run / "reward.partial" / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-15])
    args = ["rm", "--run-dir", str(run), "--resume", *_cli_settings(tiny_world_config, checkpoint_every=5)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "reward" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)


def test_a_metrics_line_spoilt_inside_the_log_is_named(finished, tmp_path, tiny_world_config):
    run, _ = _unfinished(finished, tmp_path, "reward")
    metrics = run / "reward.partial" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join([lines[0], "{oops\n", *lines[1:]]))
    args = ["rm", "--run-dir", str(run), "--resume", *_cli_settings(tiny_world_config, checkpoint_every=5)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"{metrics}: line 2 is not JSON" in result.output.replace("\n", "")


def test_a_spoilt_sft_checkpoint_is_named(finished, tmp_path, tiny_world_config):
    run, found = _unfinished(finished, tmp_path, "sft")
    (found[-1] / "optimizer.bin").write_bytes(b"garbage")
    args = ["sft", "--run-dir", str(run), "--resume", *_cli_settings(tiny_world_config, checkpoint_every=5)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"{found[-1]}: optimizer.bin cannot be read (UnpicklingError" in result.output.replace("\n", "")


def test_resuming_a_finished_sft_logs_no_row_twice(finished, tmp_path, tiny_world_config, monkeypatch):
    """Resumed from its last checkpoint, a finished stage trains its last steps again, bit for bit, and its log
    keeps one row a step (the Trainer's own loop appended its last rows again)."""
    # trained in this process on its own thread count, which the command must keep to repeat its sums bit for bit
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    shutil.copytree(finished, tmp_path / "run")
    metrics = tmp_path / "run" / "sft" / "metrics.jsonl"
    untimed = lambda: [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(metrics)]  # noqa: E731
    before = untimed()
    result = CliRunner().invoke(
        app, ["sft", "--run-dir", str(tmp_path / "run"), "--resume", *_cli_settings(tiny_world_config)]
    )
    assert result.exit_code == 0, result.output
    assert "resumed sft at step" in result.output
    assert untimed() == before


def test_an_empty_truth_file_is_named(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    (tmp_path / "run" / "world" / "truth.json").write_text("")
    result = CliRunner().invoke(app, ["probe", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'run' / 'world' / 'truth.json'} cannot be read" in result.output.replace("\n", "")


def test_written_files_and_folders_get_ordinary_permissions(tmp_path):
    """Through tempfile they were private: report.md was written 0600, a model folder 0700."""
    from pmrlhf.io import atomic_dir, atomic_write_text

    umask = os.umask(0o022)
    try:
        report = atomic_write_text(tmp_path / "report.md", "x")
        model = atomic_dir(tmp_path / "model", lambda tmp: (tmp / "weights").write_text("y"))
    finally:
        os.umask(umask)
    assert (report.stat().st_mode & 0o777, model.stat().st_mode & 0o777) == (0o644, 0o755)
