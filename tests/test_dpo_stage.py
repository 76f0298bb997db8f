import json
import math
import tempfile

import pytest
import torch

from pmrlhf.config import DataConfig, ModelConfig
from pmrlhf.data.tokenize import Encoder, word_tokenizer
from pmrlhf.data.world import World, WorldConfig
from pmrlhf.models import load_causal_lm
from pmrlhf.objectives.dpo import DPO_LOSSES, Pairs
from pmrlhf.stages import dpo as stage

ROWS = [
    {"prompt": "q1 :", "chosen": " w3 w4", "rejected": " w5"},
    {"prompt": "q2 :", "chosen": " w6", "rejected": " w7 w8 w9"},
    {"prompt": "q0 :", "chosen": " w1 w2 w3", "rejected": " w9 w1"},
    {"prompt": "q3 :", "chosen": " w2", "rejected": " w4 w5 w6 w7"},
]


@pytest.fixture(scope="module")
def models():
    tok = word_tokenizer(World.generate(WorldConfig(n_prompts=4, vocab_words=12)).vocabulary())
    torch.manual_seed(0)
    policy = load_causal_lm(ModelConfig(), tok).eval()
    torch.manual_seed(1)
    reference = load_causal_lm(ModelConfig(), tok, trainable=False)
    return tok, policy, reference


def ours(tok, policy, reference, config: stage.DPOConfig) -> float:
    enc = Encoder(tok)
    pairs = [(enc.prompt(r["prompt"]), enc.response(r["chosen"]), enc.response(r["rejected"])) for r in ROWS]
    with torch.no_grad():
        c, r, lc, lr = stage.batch_logprobs(policy, pairs, tok.pad_token_id)
        rc, rr, _, _ = stage.batch_logprobs(reference, pairs, tok.pad_token_id)
        return stage.loss_fn(config)(Pairs(c, r, rc, rr, lc, lr))[0].mean().item()


def trl_first_loss(tok, policy, reference, loss_type: str, beta: float, label_smoothing: float) -> float:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    with tempfile.TemporaryDirectory() as d:
        args = DPOConfig(
            output_dir=d,
            per_device_train_batch_size=len(ROWS),
            max_steps=1,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            beta=beta,
            loss_type=[loss_type],
            label_smoothing=label_smoothing,
            use_cpu=True,
            learning_rate=0.0,
            disable_tqdm=True,
            bf16=False,
        )  # TRL autocasts to bf16 on CPU unless told not to
        trainer = DPOTrainer(
            model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok
        )
        trainer.train()
    return trainer.state.log_history[0]["loss"]


@pytest.mark.parametrize(
    "loss,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 2.0, 0.0), ("ipo", 0.5, 0.0), ("robust", 0.3, 0.2)]
)
def test_first_step_loss_matches_trl(models, loss, beta, eps):
    tok, policy, reference = models
    mine = ours(tok, policy, reference, stage.DPOConfig(loss=loss, beta=beta, label_smoothing=eps))
    assert abs(mine - math.log(2)) > 1e-3  # the policy and the reference differ, so this is not a trivial match
    assert mine == pytest.approx(trl_first_loss(tok, policy, reference, loss, beta, eps), abs=1e-5)


def test_dpo_stage_runs_every_loss_and_writes_an_hf_model(tmp_path, tiny_world_config):
    from transformers import AutoModelForCausalLM

    from pmrlhf.stages import sft

    sft.run(sft.SFTConfig(run_dir=str(tmp_path), world=tiny_world_config))
    for loss in sorted(DPO_LOSSES):
        cfg = stage.DPOConfig(
            run_dir=str(tmp_path),
            world=tiny_world_config,
            name=f"dpo-{loss}",
            loss=loss,
            data=DataConfig(portion="reward", limit=64),
            label_smoothing=0.1 if loss == "robust" else 0,
        )
        cfg.optim.epochs = 1
        path = stage.run(cfg)
        AutoModelForCausalLM.from_pretrained(path)
        summary = json.loads((tmp_path / f"dpo-{loss}" / "summary.json").read_text())
        objective = json.loads((tmp_path / f"dpo-{loss}" / "objective.json").read_text())
        assert objective["method"] == "dpo" and objective["loss"] == loss and summary["steps"] >= 1
    with pytest.raises(ValueError, match="unknown DPO loss"):
        stage.DPOConfig(loss="kto").validate()
