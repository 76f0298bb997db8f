"""Inputs that gave a traceback, or a message that did not say what to fix, and now give one line naming what
was wrong and what would be right, with exit code 2 (1 where the run itself failed), and nothing half-written."""

import errno
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import copy_run, ppo_config
from pmrlhf.cli import app
from pmrlhf.config import ModelConfig
from pmrlhf.data.tokenize import word_tokenizer
from pmrlhf.data.world import World, WorldConfig
from pmrlhf.models import load_causal_lm, save_model

COMPARISON = {"prompt": "w1 w2", "chosen": "w3", "rejected": "w4"}


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    """An untrained tiny language model with a world tokenizer: something to break."""
    tok = word_tokenizer(World.generate(WorldConfig(n_prompts=4)).vocabulary())
    return save_model(load_causal_lm(ModelConfig(), tok), tok, tmp_path_factory.mktemp("lm") / "model")


def broken_copy(lm: Path, tmp: Path, what: str) -> Path:
    import shutil

    folder = tmp / f"model-{what}"
    if what == "empty":
        folder.mkdir()
        return folder
    shutil.copytree(lm, folder)
    if what == "weights":
        (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    elif what == "config":
        (folder / "config.json").write_text("{not json")
    elif what == "no-eos":
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["eos_token"] = None
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def invalid_yaml(tmp):
    (tmp / "bad.yaml").write_bytes(b"optim:\n  lr: \xff\xfe\n")
    return ["rm", "--config", str(tmp / "bad.yaml")]


def non_utf8_rows(tmp):
    path = tmp / "rows.jsonl"
    path.write_bytes(json.dumps(COMPARISON).encode() + b"\n" + b'{"prompt": "\xe9t\xe9"}\n')
    return ["rm", "--set", f"data.source={path}"]


def conversational(tmp, on_error):
    good = {
        "prompt": [{"role": "user", "content": "w1"}],
        "chosen": [{"role": "assistant", "content": "w2"}],
        "rejected": [{"role": "assistant", "content": "w3"}],
    }
    bad = {**good, "prompt": [{"role": "user", "content": 5}]}
    path = write_jsonl(tmp / "conv.jsonl", [bad, good, {**good, "chosen": [{"role": "assistant", "content": None}]}])
    # the hh-rlhf layout's "Human:" and "Assistant:" are words the world's tokenizer does not know
    unknown = ["--set", "data.max_unknown_share=1", "--set", "data.portion=all"]
    return ["dpo", "--set", f"data.source={path}", "--set", f"data.on_error={on_error}", "--set", "loss=pm", *unknown]


RECIPE = str(Path(__file__).parents[1] / "configs" / "recipes" / "llama3.2-1b-tldr.yaml")


def duplicate_key(tmp):
    (tmp / "twice.yaml").write_text("optim:\n  lr: 0.1\nseed: 3\noptim:\n  batch_size: 4\n")
    return ["rm", "--config", str(tmp / "twice.yaml")]


def accelerate_config(tmp, text):
    (tmp / "accelerate.yaml").write_text(text)
    return ["plan", RECIPE, "--accelerate-config", str(tmp / "accelerate.yaml")]


def pipeline_yaml(tmp, text, command="run"):
    (tmp / f"{command}.yaml").write_text(text)
    return [command, str(tmp / f"{command}.yaml")]


BAD_VARIANT = "variants: [{name: odd, penalty: cpm_token, alpha_ctl: 0}]\n"
BAD_METHOD = "sweep_dir: {d}\ngrid: [{{name: odd, penalty: kl, gamma: -3}}]\n"

# (name, argv from the test's folder, exit code, what the one line says)
CASES = [
    # a setting's range, said with its name, from every command that takes it
    ("epochs inf", lambda t: ["rm", "--set", "optim.epochs=.inf"], 2, "optim.epochs: must be a finite number, got inf"),
    ("length_bias inf", lambda t: ["world", "--set", "length_bias=.inf"], 2, "length_bias: must be a finite number"),
    ("ref_noise nan", lambda t: ["world", "--set", "ref_noise=.nan"], 2, "ref_noise: must be a finite number, got nan"),
    ("ref_noise -1", lambda t: ["world", "--set", "ref_noise=-1"], 2, "ref_noise must be >= 0"),
    ("demonstrations -5", lambda t: ["world", "--set", "n_demonstrations=-5"], 2, "n_demonstrations must be >= 0"),
    ("rankings -1", lambda t: ["world", "--set", "n_rankings=-1"], 2, "n_rankings must be >= 0, got -1"),
    ("seed huge", lambda t: ["rm", "--set", "seed=99999999999999999999"], 2, "seed: a seed must be in [0, 2**32)"),
    ("seed -1", lambda t: ["dpo", "--set", "seed=-1"], 2, "seed: a seed must be in [0, 2**32), got -1"),
    ("split seed -1", lambda t: ["sft", "--set", "data.split_seed=-1"], 2, "data.split_seed: a seed must be in"),
    ("eval_every 0", lambda t: ["rm", "--set", "eval_every=0"], 2, "eval_every must be >= 1, got 0"),
    ("patience -1", lambda t: ["rm", "--set", "patience=-1"], 2, "patience must be >= 0"),
    ("gamma -3", lambda t: ["ppo", "--set", "gamma=-3"], 2, "gamma must be in [0, 1], got -3"),
    ("lam 7", lambda t: ["ppo", "--set", "lam=7"], 2, "lam must be in [0, 1], got 7"),
    ("clip -0.2", lambda t: ["ppo", "--set", "clip=-0.2"], 2, "clip must be > 0, got -0.2"),
    ("ema_decay 2", lambda t: ["ppo", "--set", "ema_decay=2"], 2, "ema_decay must be in [0, 1)"),
    ("kl_ctl -1", lambda t: ["ppo", "--set", "kl_ctl=-1"], 2, "penalty.coef (kl_ctl / ent_ctl) must be >= 0, got -1"),
    ("tau 0", lambda t: ["ppo", "-s", "penalty.name=maxent", "-s", "penalty.tau=0"], 2, "penalty.tau must be > 0"),
    ("ptx -1", lambda t: ["ppo", "--set", "ptx_coef=-1"], 2, "ptx_coef must be >= 0, got -1"),
    ("lr not YAML", lambda t: ["rm", "--set", "optim.lr=[1"], 2, "optim.lr: '[1' is not a YAML value"),
    ("signs twice", lambda t: ["rm", "--set", "optim.batch_size=+-5"], 2, "optim.batch_size: expected an integer"),
    # the same refusal from a pipeline's variant and a sweep's method, naming the method
    ("run variant", lambda t: pipeline_yaml(t, BAD_VARIANT), 2, "odd: penalty.alpha must be in (0, 1], got 0"),
    ("sweep method", lambda t: pipeline_yaml(t, BAD_METHOD.format(d=t / "s"), "sweep"), 2, "odd: gamma must be in"),
    ("run seed", lambda t: pipeline_yaml(t, "seed: -2\n"), 2, "seed: a seed must be in [0, 2**32), got -2"),
    ("dpo alpha 0", lambda t: ["dpo", "--set", "loss=cpm", "--set", "alpha=0"], 2, "alpha must be in (0, 1]"),
    ("dpo alpha 2", lambda t: ["dpo", "--set", "loss=cpm", "--set", "alpha=2"], 2, "alpha must be in (0, 1]"),
    ("top_p 0", lambda t: ["ppo", "--set", "top_p=0"], 2, "top_p must be in (0, 1]"),
    ("temperature 0", lambda t: ["ppo", "--set", "temperature=0"], 2, "temperature must be > 0"),
    ("minibatch 0", lambda t: ["ppo", "--set", "optim.batch_size=0"], 2, "optim.batch_size must be >= 1"),
    ("moved", lambda t: ["ppo", "--set", "minibatch_size=4"], 2, "minibatch_size is now optim.batch_size"),
    ("prompts 0", lambda t: ["ppo", "--set", "prompts_per_iteration=0"], 2, "prompts_per_iteration must be >= 1"),
    ("batch 0", lambda t: ["rm", "--set", "optim.batch_size=0"], 2, "optim.batch_size must be >= 1"),
    ("accumulation 0", lambda t: ["dpo", "--set", "optim.grad_accum=0"], 2, "optim.grad_accum must be >= 1"),
    ("float64", lambda t: ["sft", "--set", "model.dtype=float64"], 2, "model.dtype must be one of float32"),
    (
        "world of no prompts",
        lambda t: ["world", "--set", "n_prompts=0"],
        2,
        "n_prompts must be >= 1",
    ),
    ("YAML not UTF-8", invalid_yaml, 2, "bad.yaml: not UTF-8 text"),
    ("data not UTF-8", non_utf8_rows, 2, "rows.jsonl: row 2: not UTF-8 text"),
    ("unknown suffix", lambda t: ["rm", "--set", f"data.source={t / 'rows.tsv'}"], 2, "unsupported file type '.tsv'"),
    ("message types", lambda t: conversational(t, "raise"), 2, "conv.jsonl: row 1: field 'prompt': message"),
    # each of these was taken, and lost or spoilt a result
    ("lr inf", lambda t: ["rm", "--set", "optim.lr=.inf"], 2, "optim.lr: must be a finite number, got inf"),
    ("lr nan", lambda t: ["dpo", "--set", "optim.lr=.nan"], 2, "optim.lr: must be a finite number, got nan"),
    ("critic lr inf", lambda t: ["ppo", "--set", "critic_lr=.inf"], 2, "critic_lr: must be a finite number, got inf"),
    ("keep no checkpoint", lambda t: ["rm", "--set", "keep_checkpoints=-1"], 2, "keep_checkpoints must be >= 1"),
    ("keep 0 checkpoints", lambda t: ["sft", "--set", "keep_checkpoints=0"], 2, "keep_checkpoints must be >= 1"),
    ("checkpoint -1", lambda t: ["ppo", "--set", "checkpoint_every=-1"], 2, "checkpoint_every must be >= 0"),
    ("pm with top_p", lambda t: ["ppo", "--set", "penalty=pm", "--set", "top_p=0.9"], 2, "set top_p: 1"),
    ("a key twice", duplicate_key, 2, "twice.yaml: line 4: 'optim' is given twice (first on line 1)"),
    ("plan -2 GPUs", lambda t: ["plan", RECIPE, "--gpus", "-2"], 2, "--gpus must be >= 1, got -2"),
    ("plan 0 GPUs", lambda t: ["plan", RECIPE, "--gpus", "0"], 2, "--gpus must be >= 1, got 0"),
    ("plan -5 GiB", lambda t: ["plan", RECIPE, "--gpu-memory", "-5"], 2, "--gpu-memory must be a finite number"),
    ("plan nan GiB", lambda t: ["plan", RECIPE, "--gpu-memory", "nan"], 2, "--gpu-memory must be a finite number"),
    ("plan 3 GPUs", lambda t: ["plan", RECIPE, "--gpus", "3"], 2, "prompts_per_iteration=32 is not a multiple of 3"),
    (
        "plan no accelerate config",
        lambda t: ["plan", RECIPE, "--accelerate-config", str(t / "none.yaml")],
        2,
        "none.yaml does not exist",
    ),
    ("plan malformed accelerate", lambda t: accelerate_config(t, "a: [1\n"), 2, "accelerate.yaml: not valid YAML"),
    ("fetch unknown", lambda t: ["fetch", "nope"], 2, "no release named 'nope' to fetch; known: smollm2"),
    (
        "reward function",
        lambda t: ["ppo", "--set", "reward_function=no.such:f"],
        2,
        "reward_function 'no.such:f' cannot",
    ),
    ("world realtext", lambda t: ["world", "--set", "kind=realtext"], 2, "a realtext world is sampled from its model"),
    (
        "plan ZeRO-3",
        lambda t: accelerate_config(t, "distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 3}\n"),
        2,
        "only ZeRO-2 is supported",
    ),
]


@pytest.mark.parametrize("name,argv,code,message", CASES, ids=[c[0] for c in CASES])
def test_each_bad_input_gets_one_line_and_its_exit_code(tmp_path, name, argv, code, message):
    args = argv(tmp_path)
    if args[0] == "world":
        args += ["--out", str(tmp_path / "world")]
    elif args[0] not in ("plan", "sweep", "fetch"):
        args += ["--run-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "reward").exists() and not (tmp_path / "run" / "dpo").exists()


@pytest.mark.parametrize(
    "what,message",
    [
        ("empty", "cannot be loaded as a tokenizer"),
        ("weights", "cannot be loaded as a language model (the folder said"),
        ("config", "cannot be loaded as"),
        ("no-eos", "has no end-of-sequence token"),
    ],
)
def test_a_broken_model_folder_is_named(lm, tmp_path, what, message):
    folder = broken_copy(lm, tmp_path, what)
    result = CliRunner().invoke(
        app, ["dpo", "--run-dir", str(tmp_path / "run"), "--set", f"model.name_or_path={folder}"]
    )
    assert result.exit_code == 2, result.output
    assert str(folder) in result.output.replace("\n", "") and message in result.output.replace("\n", "")


def test_rows_with_wrong_message_types_are_skipped_and_counted_when_asked(tmp_path, lm):
    result = CliRunner().invoke(
        app,
        [*conversational(tmp_path, "skip"), "--run-dir", str(tmp_path / "run"), "--set", f"model.name_or_path={lm}"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "dpo" / "summary.json").read_text())
    assert "1 of 3 rows kept" in summary["data"]


def test_a_prompt_longer_than_the_model_reads_is_cut_to_fit_and_said(tmp_path, lm):
    """The tiny model has 128 positions; 200-token prompts with data.max_prompt_tokens 1000 raised IndexError."""
    long = " ".join(f"w{i % 12}" for i in range(200))
    rows = [{"prompt": long, "chosen": f"w{i % 12}", "rejected": f"w{(i + 1) % 12}"} for i in range(40)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    args = [
        "rm",
        "--run-dir",
        str(tmp_path / "run"),
        "--set",
        f"data.source={path}",
        "--set",
        f"model.name_or_path={lm}",
    ]
    result = CliRunner().invoke(app, [*args, "--set", "data.max_prompt_tokens=1000", "--set", "optim.epochs=1"])
    assert result.exit_code == 0, result.output
    text = result.output.replace("\n", "")
    assert "prompts truncated from the left" in text and "fit the model's 128 positions" in text


def test_a_hub_name_without_a_network_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = ["rm", "--run-dir", str(tmp_path), "--set", "data.source=nobody/no-such-dataset"]
    result = subprocess.run(
        [sys.executable, "-m", "pmrlhf", *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "nobody/no-such-dataset: could not load it from the Hugging Face Hub" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_run_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """As root every folder is writable, so the refusal the file system would give is made here."""
    import pmrlhf.stages.run_folder as run_folder

    def refuse(config, path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(run_folder, "save_config", refuse)
    result = CliRunner().invoke(app, ["rm", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "cannot write" in result.output and "choose a writable --run-dir" in result.output


def test_a_full_disk_during_a_checkpoint_removes_the_half_written_one(
    trained, tmp_path, monkeypatch, tiny_world_config
):
    import accelerate

    from pmrlhf.stages import ppo

    copy_run(trained, tmp_path)

    def full(self, output_dir, **kw):
        (Path(output_dir) / "model.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    cfg = ppo_config(tmp_path, tiny_world_config, iterations=3, checkpoint_every=1)
    with pytest.raises(ValueError, match="no space left on the device while writing checkpoint iter-000001"):
        ppo.run(cfg)
    checkpoints = tmp_path / "ppo.partial" / "checkpoints"
    assert not list(checkpoints.glob(".*")) and not list(checkpoints.glob("iter-*"))


@pytest.mark.parametrize("answers", [True, False])
def test_the_hub_is_set_offline_when_it_takes_no_connection(monkeypatch, answers):
    """Without it each Hub name retried for 30-50 s here (no network) before its one-line error."""
    import socket

    import datasets.config
    import huggingface_hub.constants as hub

    import pmrlhf.data.sources as sources

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if not answers:
        listener.close()  # nothing listens there now: the connection is refused
    monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sources, "_hub_checked", False)
    sources.offline_unless_hub_answers()
    listener.close()
    assert hub.HF_HUB_OFFLINE is datasets.config.HF_HUB_OFFLINE is (not answers)


def test_data_the_tokenizer_does_not_know_is_refused(lm, tmp_path):
    """SFT on words the model's tokenizer lacks trained on <unk>s (54 %) and reported a perplexity as if it
    had learnt something."""
    rows = [{"prompt": "w1 w2", "response": f"nowhere{i} w3"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    args = ["sft", "--run-dir", str(tmp_path / "run"), "-s", f"data.source={path}", "-s", f"model.name_or_path={lm}"]
    args += ["-s", "data.portion=all"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "sft: 20 of the data's 80 tokens (25%) are the tokenizer's unknown token '<unk>'" in result.output.replace(
        "\n", ""
    )
    assert not (tmp_path / "run" / "sft").exists()
    allowed = CliRunner().invoke(app, [*args, "-s", "data.max_unknown_share=0.3", "-s", "optim.epochs=1"])
    assert allowed.exit_code == 0, allowed.output
    assert "20 tokens unknown to the tokenizer" in allowed.output.replace("\n", "")


def other_tokenizer_model(tmp: Path, vocab_words: int, reward: bool) -> Path:
    from pmrlhf.models import load_reward_model

    tok = word_tokenizer(World.generate(WorldConfig(n_prompts=4, vocab_words=vocab_words)).vocabulary())
    load = load_reward_model if reward else load_causal_lm
    return save_model(load(ModelConfig(), tok), tok, tmp / f"other-{vocab_words}")


@pytest.mark.parametrize("command", ["ppo", "probe"])
def test_a_reward_model_of_another_tokenizer_is_refused(lm, tmp_path, command):
    """The policy's token ids went to a reward model that read them as other words."""
    reward = other_tokenizer_model(tmp_path, 12, reward=True)
    where = ["-s", f"policy.name_or_path={lm}", "-s", f"reward.name_or_path={reward}", "-s", "iterations=1"]
    if command == "probe":
        where = ["-s", f"reference={lm}", "-s", f"reward={reward}"]
    result = CliRunner().invoke(app, [command, "--run-dir", str(tmp_path / "run"), "-s", "world.n_prompts=4", *where])
    assert result.exit_code == 2, result.output
    assert f"{reward} (a reward model) was trained with another tokenizer than {lm}" in result.output.replace("\n", "")


def test_a_tokenizer_larger_than_the_models_embedding_is_refused(lm, tmp_path):
    """transformers grew the embedding by random rows for the tokens it lacked, without a word."""
    import shutil

    folder = tmp_path / "grown"
    shutil.copytree(lm, folder)
    bigger = word_tokenizer(World.generate(WorldConfig(n_prompts=4, vocab_words=90)).vocabulary())
    bigger.save_pretrained(folder)
    result = CliRunner().invoke(app, ["dpo", "--run-dir", str(tmp_path / "run"), "-s", f"model.name_or_path={folder}"])
    assert result.exit_code == 2, result.output
    rows = len(word_tokenizer(World.generate(WorldConfig(n_prompts=4)).vocabulary()))
    message = f"{folder} (a language model) embeds {rows} tokens, but the tokenizer it is read with has {len(bigger)}"
    assert message in result.output.replace("\n", "")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed here")
def test_logging_to_a_missing_package_is_refused_before_any_work(tmp_path):
    """It failed after the data and models had loaded, with an 86-line traceback and a partial folder left."""
    result = CliRunner().invoke(app, ["dpo", "--run-dir", str(tmp_path), "--set", "logging.tensorboard=true"])
    assert result.exit_code == 2, result.output
    assert "logging.tensorboard needs the tensorboard package: pip install 'pmrlhf[tensorboard]'" in result.output
    assert not list(tmp_path.iterdir())


def test_a_stage_on_its_own_takes_every_row_and_says_why_when_it_does_not(lm, tmp_path):
    """The paper's 20/40/40 split is the pipeline's: `pmrlhf rm` on 30 rows kept 12 of them without saying why."""
    rows = [{"prompt": f"w{i % 12}", "chosen": "w1 w2", "rejected": f"w{3 + i % 9}"} for i in range(30)]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    args = ["rm", "-s", f"data.source={path}", "-s", f"model.name_or_path={lm}", "-s", "optim.epochs=1"]
    result = CliRunner().invoke(app, [*args, "--run-dir", str(tmp_path / "all")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "all" / "reward" / "summary.json").read_text())["data"].endswith("30 of 30 rows kept")
    split = CliRunner().invoke(app, [*args, "--run-dir", str(tmp_path / "part"), "-s", "data.portion=reward"])
    assert split.exit_code == 0, split.output
    summary = json.loads((tmp_path / "part" / "reward" / "summary.json").read_text())
    assert summary["data"].endswith("12 of 30 rows kept (data.portion: reward, its 40 % of the paper's 20/40/40 split)")


def test_a_stage_after_sft_without_an_sft_model_says_so(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [COMPARISON] * 4)
    result = CliRunner().invoke(app, ["dpo", "--run-dir", str(tmp_path / "run"), "-s", f"data.source={path}"])
    assert result.exit_code == 2, result.output
    text = result.output.replace("\n", "")
    assert f"no model to start from for {path}: set model.name_or_path" in text
    assert f"{tmp_path / 'run' / 'sft' / 'model'} once `pmrlhf sft` has written it" in text
