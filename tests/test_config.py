import dataclasses

import pytest

from pmrlhf.config import ConfigError, from_dict, load_config
from pmrlhf.stages import dpo, ppo, reward, sft
from pmrlhf.stages.pipeline import PipelineConfig


@pytest.mark.parametrize(
    "cls,override,section,key",
    [
        (sft.SFTConfig, "optim.epochs=2", "optim", "epochs"),
        (reward.RewardConfig, "data.source=rows.parquet", "data", "source"),
        (ppo.PPOConfig, "data.source=prompts.jsonl", "data", "source"),
        (ppo.PPOConfig, "logging.tensorboard=false", "logging", "tensorboard"),
        (dpo.DPOConfig, "optim.lr=0.5", "optim", "lr"),
    ],
)
def test_an_override_changes_its_key_only(cls, override, section, key):
    """``--set section.key=value`` keeps every other key of the section at the stage's own default (SFT's lr 3e-3
    and batch 32, PPO's 16 response tokens and log_every 1), not at the bare
    sub-config's."""
    value = override.split("=", 1)[1]
    got = getattr(load_config(cls, None, [override]), section)
    default = getattr(cls(), section)
    given = value == "true" if isinstance(getattr(default, key), bool) else type(getattr(default, key))(value)
    expected = dataclasses.replace(default, **{key: given})
    assert got == expected


def test_a_yaml_section_given_in_part_keeps_the_stage_defaults_beneath(tmp_path):
    path = tmp_path / "ppo.yaml"
    path.write_text("data:\n  source: prompts.jsonl\nlogging: {wandb: false}\n")
    cfg = load_config(ppo.PPOConfig, path, ["data.max_prompt_tokens=64"])
    assert (cfg.data.portion, cfg.data.max_response_tokens, cfg.data.max_prompt_tokens) == ("all", 16, 64)
    assert cfg.data.source == "prompts.jsonl" and cfg.logging.log_every == 1
    with pytest.raises(ConfigError, match="data.nope"):
        load_config(ppo.PPOConfig, path, ["data.nope=1"])


def test_the_pipeline_dpo_section_keeps_the_demo_batch():
    """The demo's DPO runs take 16 comparisons a batch, as they did before sections merged with stage defaults."""
    cfg = PipelineConfig().stage_configs()["dpo"]
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.batch_size) == (3e-4, 3, 16)


COMMAND_CONFIGS = {
    "world": "pmrlhf.data.world:WorldConfig",
    "sft": "pmrlhf.stages.sft:SFTConfig",
    "rm": "pmrlhf.stages.reward:RewardConfig",
    "ppo": "pmrlhf.stages.ppo:PPOConfig",
    "dpo": "pmrlhf.stages.dpo:DPOConfig",
    "eval": "pmrlhf.stages.evaluate:EvalConfig",
    "probe": "pmrlhf.stages.evaluate:ProbeConfig",
    "run": "pmrlhf.stages.pipeline:PipelineConfig",
    "sweep": "pmrlhf.stages.sweep:SweepConfig",
}


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_help_lists_every_setting_with_its_default_and_description(command):
    import importlib

    from typer.testing import CliRunner

    from pmrlhf.cli import app
    from pmrlhf.config import describe

    module, name = COMMAND_CONFIGS[command].split(":")
    rows = describe(getattr(importlib.import_module(module), name))
    assert all(doc for _, _, doc in rows), [key for key, _, doc in rows if not doc]  # a setting without a word
    out = " ".join(CliRunner().invoke(app, [command, "--help"], terminal_width=400).output.split())
    for key, default, doc in rows:
        shown = f"{key}: " if default == "section" else f"{key} = {default!r}: "
        assert shown + " ".join(doc.split())[:40] in out, key


def test_a_setting_is_described_by_the_comment_on_its_line_or_the_lines_above():
    from pmrlhf.config import field_docs
    from pmrlhf.stages.ppo import PenaltyConfig, PPOConfig

    docs = field_docs(PenaltyConfig)
    assert docs["tau"] == "tau of maxent"
    assert docs["placement"].startswith('for kl: "reward" (k1 per token, eq. (2.3)) or "loss"')
    assert docs["placement"].endswith("differentiated as in GRPO but per response")
    assert field_docs(PPOConfig)["mixed_precision"].startswith("no | bf16 | fp16; None: the half type")


def test_version_prints_without_a_command():
    from typer.testing import CliRunner

    from pmrlhf import __version__
    from pmrlhf.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == __version__


def test_string_settings_from_the_command_line_are_taken_as_written():
    """A run folder with `` #`` was cut at the comment, ``017`` became 15, ``on`` True, ``1.10`` 1.1: a string
    setting keeps the text; other settings read it as YAML, and a value that is not YAML names its setting."""
    cfg = load_config(
        sft.SFTConfig,
        None,
        ["run_dir=runs/exp #2", "name=017", "data.source=1.10", "world.kind=text", "optim.lr=2e-4", "data.limit=5"],
    )
    assert (cfg.run_dir, cfg.name, cfg.data.source) == ("runs/exp #2", "017", "1.10")
    assert (cfg.optim.lr, cfg.data.limit, cfg.world.kind) == (2e-4, 5, "text")
    assert load_config(sft.SFTConfig, None, ["name=on"]).name == "on"
    assert load_config(dpo.DPOConfig, None, ["data.hf_config=null"]).data.hf_config is None  # str | None
    with pytest.raises(ConfigError, match=r"optim.lr: '\[1' is not a YAML value"):
        load_config(sft.SFTConfig, None, ["optim.lr=[1"])
    pipeline = load_config(PipelineConfig, None, ["ppo.iterations=7", "run_dir=2026-12-05"])
    assert pipeline.ppo["iterations"] == 7 and pipeline.run_dir == "2026-12-05"


def test_the_readmes_examples_are_valid_configs(tmp_path):
    """The README's pipeline file and its one-stage commands: every stage of the one, and the config of each of
    the others, are what the command line would accept."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (tmp_path / "my-run.yaml").write_text(re.search(r"```yaml\n(.*?)```", readme, re.S).group(1))
    configs = load_config(PipelineConfig, tmp_path / "my-run.yaml").stage_configs()
    assert configs["ppo-cpm-prefix"].penalty.name == "cpm_prefix" and configs["ppo-cpm-prefix"].penalty.alpha == 0.01
    assert configs["ppo-kl"].penalty.coefficient() == 1.0 and configs["dpo-pm"].loss == "pm"
    commands = [shlex.split(line.split("#")[0]) for line in readme.splitlines() if line.startswith("pmrlhf ")]
    stages = {"ppo": ppo.PPOConfig, "dpo": dpo.DPOConfig}
    checked = 0
    for argv in commands:
        if argv[1] in stages and "--help" not in argv:
            overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
            config = load_config(stages[argv[1]], None, overrides)
            config.validate()
            checked += 1
    assert checked == 2


def test_the_thread_count_follows_the_models_a_command_names(monkeypatch):
    """One thread where every model is a tiny one built from config (two spun against any other busy process),
    torch's own count for a real model or a world sampled from one, and a count the user set left alone."""
    import torch

    from pmrlhf.stages import pipeline, sweep
    from pmrlhf.training.setup import threads_for

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    real_world = from_dict(sweep.SweepConfig, {"pipeline": {"world": {"kind": "realtext"}}, "grid": [{"name": "a"}]})
    real_policy = from_dict(pipeline.PipelineConfig, {"policy": {"name_or_path": "some/model"}})
    try:
        torch.set_num_threads(2)
        for config, threads in ((real_world, 2), (real_policy, 2), (pipeline.demo_config(quick=True), 1)):
            with threads_for(config) as n:
                assert n == torch.get_num_threads() == threads
            assert torch.get_num_threads() == 2  # the process's own count, back after the command
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        with threads_for(pipeline.demo_config(quick=True)) as n:
            assert n == 2
    finally:
        torch.set_num_threads(before)


def test_the_ppo_command_and_its_penalty_setting_name_every_registered_penalty():
    from pmrlhf.cli import ppo as command
    from pmrlhf.config import field_docs
    from pmrlhf.objectives.penalties import PENALTIES
    from pmrlhf.stages.ppo.config import PenaltyConfig

    for name in PENALTIES:
        assert name in command.__doc__ and name in field_docs(PenaltyConfig)["name"], name
