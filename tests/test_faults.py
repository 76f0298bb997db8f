"""Faults of the machine rather than of the input: a real full disk, a read-only folder, a run stopped by a
signal. Each ends in one line saying what happened and where the state is, and leaves nothing half-written."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pmrlhf.cli import app


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
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


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
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    checkpoints = tmp_path / "reward.partial" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    assert (
        f"stopped: the checkpoints written so far are kept under {tmp_path / 'reward.partial'}; the same command "
        "with --resume continues" in err.replace("\n", "")
    )
    assert "Traceback" not in err
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed reward at step" in resumed.stderr
