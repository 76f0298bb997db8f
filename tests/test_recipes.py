"""Every GPU recipe in configs/recipes: loaded, validated, and run end to end on its stand-in (``stages.standin``:
tiny local models of its families, a small local file of its data's format). Only the download is untested."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from pmrlhf.config import InputError, from_dict
from pmrlhf.stages import pipeline, standin

RECIPES = sorted((Path(__file__).parent.parent / "configs" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_validates_and_runs_on_its_stand_in(recipe, tmp_path):
    """``pmrlhf run RECIPE --stand-in``, as docs/distributed.md gives it."""
    from typer.testing import CliRunner

    from pmrlhf.cli import app

    data = yaml.safe_load(recipe.read_text())
    config = from_dict(pipeline.PipelineConfig, data)
    stages = config.stage_configs()  # every stage's config is complete and valid
    assert len(config.variants) == 15  # beta in {0.1, 0.5, 1} x (KL, alpha in {0.1, 0.3, 0.5}, cpm_prefix at 0.01)
    assert {v.beta for v in stages.values() if hasattr(v, "beta") and hasattr(v, "penalty")} == {0.1, 0.5, 1.0}
    assert config.data.source in ("Dahoas/full-hh-rlhf", "CarperAI/openai_summarize_comparisons")

    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(recipe), "--stand-in", "--run-dir", str(run)])
    assert result.exit_code == 0, result.output

    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert len(summary) == 16 and all(m["length"] >= 1 for m in summary.values())
    assert "| ppo-cpm0.3-beta0.5 | 0.5 |" in (run / "report" / "report.md").read_text()
    # The recipe's own data handling ran: the 20/40/40 split gave each stage its portion of the 40 rows.
    sft_summary = json.loads((run / "sft" / "summary.json").read_text())
    assert sft_summary["train_examples"] + sft_summary["eval_examples"] == 8
    # The family's BOS starts every prompt the stages encode, and a tokenizer without a pad token pads with EOS.
    from pmrlhf.data.tokenize import Encoder
    from pmrlhf.models import load_tokenizer

    tok = load_tokenizer(run / "sft" / "model")
    assert Encoder(tok).prompt("why is the sky blue?")[0] == tok.bos_token_id
    assert (tok.pad_token == tok.eos_token) == ("opt" not in recipe.stem)
    family = {"opt": "OPTForCausalLM", "llama2": "LlamaForCausalLM", "llama3": "LlamaForCausalLM"}
    saved = yaml.safe_load((run / "sft" / "config.yaml").read_text())["model"]["name_or_path"]
    architecture = json.loads((Path(saved) / "config.json").read_text())["architectures"][0]
    assert architecture == family[recipe.stem.split("-")[0].replace(".2", "")]


def test_a_stand_in_keeps_the_users_own_file_and_refuses_a_format_it_cannot_write(tmp_path):
    config = from_dict(pipeline.PipelineConfig, yaml.safe_load(RECIPES[0].read_text()))
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps(r) + "\n" for r in standin.rows("full_hh_rlhf", 12)))
    config.run_dir, config.data.source = str(tmp_path / "run"), str(mine)
    assert standin.stand_in(config).data.source == str(mine)
    config.data.source, config.data.format = "someone/ranked", "ranking"
    with pytest.raises(InputError, match="not 'ranking': set data.source to a local file"):
        standin.stand_in(config)


@pytest.mark.parametrize("arch", ["qwen2", "gpt_neox"])
def test_the_families_users_try_next_run_a_recipe_end_to_end(arch, tmp_path):
    """Qwen2 and GPT-NeoX / Pythia (byte-level BPE without BOS, as theirs) through the OPT recipe's pipeline:
    SFT, reward model, PPO with GAE and with RLOO, DPO and PM-DPO, evaluation."""
    data = yaml.safe_load(next(r for r in RECIPES if r.stem.startswith("opt")).read_text())
    rows = standin.rows("full_hh_rlhf")
    local = tmp_path / "data.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in rows]
    model = standin.tiny_model(tmp_path / "tiny", arch, "llama3", texts)
    data |= {
        "run_dir": str(tmp_path / "run"),
        "variants": [
            {"name": "ppo-kl", "penalty": "kl", "kl_ctl": 1.0},
            {
                "name": "ppo-cpm-rloo",
                "penalty": "entropy",
                "alpha_ctl": 0.3,
                "advantage": "rloo",
                "samples_per_prompt": 2,
            },
        ],
        "dpo_variants": [{"name": "dpo", "loss": "sigmoid"}, {"name": "dpo-pm", "loss": "pm"}],
    }
    data["data"]["source"] = str(local)
    for role in ("policy", "reward_model"):
        data[role] |= {"name_or_path": model, "dtype": "float32"}
    data["sft"]["optim"] |= {"batch_size": 4}
    data["reward"]["optim"] |= {"batch_size": 4}
    data["ppo"] |= {"iterations": 2, "prompts_per_iteration": 4, "max_new_tokens": 6, "checkpoint_every": 0}
    data["ppo"]["optim"] |= {"batch_size": 4}
    for section in ("eval", "probe"):
        data[section] |= {"max_new_tokens": 6, "data": {"limit": 4}}
    pipeline.run(from_dict(pipeline.PipelineConfig, data))
    summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert set(summary) == {"reference (SFT)", "ppo-kl", "ppo-cpm-rloo", "dpo", "dpo-pm"}
    assert all(m["length"] >= 1 for m in summary.values())
    assert json.loads((tmp_path / "run" / "ppo-cpm-rloo" / "objective.json").read_text())["penalty"] == "cpm_token"


@pytest.mark.parametrize("style", ["opt", "llama2", "llama3"])
def test_a_prompt_cut_from_the_left_keeps_its_start_token(style):
    """Every recipe truncates long prompts from the left: the cut keeps the BOS the tokenizer puts first (it was
    added, then cut away) and the prompt's end, in ``max_prompt_tokens`` tokens."""
    from pmrlhf.data.tokenize import Encoder

    texts = [row["prompt"] for row in standin.rows("full_hh_rlhf", 20)]
    tok = standin.recipe_tokenizer(style, texts)
    long_prompt = " ".join(texts[:3])
    full = Encoder(tok, max_prompt_tokens=10_000).prompt(long_prompt)
    enc = Encoder(tok, max_prompt_tokens=12)
    ids = enc.prompt(long_prompt)
    assert len(full) > 12 and len(ids) == 12
    assert ids[0] == tok.bos_token_id and ids[1:] == full[-11:]
    assert enc.counts == {"prompts truncated from the left": 1}


def test_a_stand_in_model_is_the_same_on_every_run(tmp_path):
    """Seeded, so that a stand-in run again reuses the stages it trained on the same weights."""
    from helpers import model_weights

    texts = [" ".join(r.values()) for r in standin.rows("comparison", 12)]
    a, b = (model_weights(Path(standin.tiny_model(tmp_path / n, "llama", "llama3", texts))) for n in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
