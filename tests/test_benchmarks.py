"""The speed benchmarks' own arithmetic, and the GPU check's code run at a tiny size on the CPU, so that neither
rots between the machines that have a GPU."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pmrlhf.models import tiny_config

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import rloo_point  # noqa: E402
import scaling  # noqa: E402


def test_an_iterations_flops_count_each_pass_from_the_shapes():
    """S = 4 + 6 = 10 tokens; a forward pass costs 2 x 100 per token in the layers, 2 x 8 x 10 per token in the
    head, and 2 x layers x width x S^2 = 3200 in causal attention; generation makes logits for the 6 new tokens
    only, the reward model none, and training costs three forward passes."""
    s = {"layers": 2, "width": 8, "vocab": 10, "hidden": 8, "body": 100, "parameters": 0}
    f = rloo_point.iteration_flops(s, sequences=3, prompt=4, new=6)
    assert f == {
        "generation": 3 * (2000 + 160 * 6 + 3200),
        "reference": 3 * (2000 + 1600 + 3200),
        "reward": 3 * (2000 + 3200),
        "training": 3 * 3 * (2000 + 1600 + 3200),
    }


def test_shapes_count_the_layers_parameters_of_a_real_architecture():
    """GPT-2: 12 h^2 + 13 h parameters a layer, and the final layer norm's 2 h; embeddings and head apart."""
    h = 64
    s = rloo_point.shapes(tiny_config("gpt2", 500, layers=2, hidden=h, heads=4))
    assert s["body"] == 2 * (12 * h * h + 13 * h) + 2 * h
    assert (s["layers"], s["width"], s["vocab"], s["hidden"]) == (2, h, 500, h)
    assert s["parameters"] == s["body"] + 500 * h + 128 * h  # tied head; 128 learned positions


def test_the_cost_curve_fit_recovers_known_coefficients_and_linear_growth_reads_one():
    points = [
        {"sequences": b, "new_tokens": n, "ours_response_length": n, "ours_s": 0.5 + 2e-3 * b * n + 1e-6 * b * n * n}
        for b in (16, 64)
        for n in (16, 64, 256)
    ]
    c = scaling.fit(points, "ours")
    assert c["c0"] == pytest.approx(0.5) and c["c1"] == pytest.approx(2e-3) and c["c2"] == pytest.approx(1e-6)
    longest = 1e-6 * 64 * 256**2
    assert c["quadratic_share_at_longest"] == pytest.approx(longest / (0.5 + 2e-3 * 64 * 256 + longest))
    linear = [dict(p, ours_s=1e-3 * p["sequences"] * p["new_tokens"]) for p in points]
    assert scaling.growth(linear, "ours") == {16: pytest.approx(1.0), 64: pytest.approx(1.0)}


def test_peak_memory_sees_a_tensor_that_came_and_went():
    with rloo_point.PeakMemory() as memory:
        held = torch.ones(2**24)  # 64 MiB
        time.sleep(0.05)
        del held
    assert 64 * 2**20 <= memory.peak < 72 * 2**20


def test_the_gpu_check_runs_every_stage_and_the_speed_point_at_a_tiny_size(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["all_finite"] is True
    for recipe in ("opt-1.3b-hh", "llama3.2-1b-tldr"):
        stages = result[recipe]
        assert list(stages) == ["sft", "reward", "ppo-kl-beta0.1", "ppo-cpm-prefix0.01-beta0.1", "dpo-pm", "eval+probe"]
        assert all(stages[s]["plan_bytes"] > 0 for s in stages if s != "eval+probe")
        assert {"loss", "train/loss", "losses/policy"} & set().union(*(s.get("losses", {}) for s in stages.values()))
        assert not (tmp_path / recipe).exists()  # the models are removed, the figures kept
    speed = result["speed"]
    assert speed["sequences"] == 8 and speed["ours_response_length"] <= 8
    assert speed["ours_tokens_per_s"] > 0 and speed["trl_tokens_per_s"] > 0
    assert 0 < speed["ours_mfu"] < 1 and speed["ours_flops"] > 0


def test_the_generation_benchmark_compares_both_samplers_at_every_length():
    import generation

    out = generation.main(["--sizes", "tiny", "--lengths", "4", "8", "--prompts", "2", "--rounds", "1"])
    points = out["tiny"]["points"]
    assert sorted(points) == [4, 8] and all(p["ours_ms"] > 0 and p["transformers_ms"] > 0 for p in points.values())
    assert out["tiny"]["growth_ms"]["ours"] == pytest.approx(points[8]["ours_ms"] - points[4]["ours_ms"])
