"""docs/own-data.md run as it is written: its commands, on its example file and config, in a copy of examples/."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGE = (ROOT / "docs" / "own-data.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE, flags=re.S)


def test_the_page_shows_the_example_config_whole_and_the_files_first_row():
    assert blocks("yaml") == [(ROOT / "examples" / "own-data.yaml").read_text()]
    rows = (ROOT / "examples" / "prefs.jsonl").read_text().splitlines()
    assert len(rows) == 30 and json.loads(blocks("json")[0]) == json.loads(rows[0])


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The page's commands in a folder holding a copy of examples/, with this interpreter's ``pmrlhf`` first on
    the path and the model cache the suite's."""
    where = tmp_path_factory.mktemp("own-data")
    shutil.copytree(ROOT / "examples", where / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    (commands,) = blocks("bash")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", commands], cwd=where, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return where / "runs" / "own-data", done.stdout


def test_every_stage_ran_on_every_row_and_the_report_is_printed(ran):
    run, stdout = ran
    assert stdout.rstrip().endswith((run / "report" / "report.md").read_text().rstrip())
    assert json.loads((run / "sft" / "summary.json").read_text())["steps"] == 0  # the instruct model as it is
    reward = json.loads((run / "reward" / "summary.json").read_text())
    assert reward["train_examples"] + reward["eval_examples"] == 30  # portion: all, not the paper's 40 %
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert list(summary) == ["reference (SFT)", "ppo-kl", "ppo-pm", "dpo", "dpo-pm"]
    for name, m in summary.items():
        for key in ("pm_divergence", "length", "perplexity", "entropy", "kl"):
            assert math.isfinite(m[key]), (name, key)
    samples = json.loads((run / "eval" / "samples.json").read_text())
    assert samples["ppo-pm"][0]["prompt"].endswith("assistant") and samples["ppo-pm"][0]["completions"][0]


def test_the_report_speaks_of_the_reward_model_only_where_there_is_no_truth(ran):
    report = (ran[0] / "report" / "report.md").read_text()
    assert "**ppo-pm** vs ppo-kl" in report and "**dpo-pm** vs dpo" in report
    assert "M(x)" not in report and "against the reward model" in report
