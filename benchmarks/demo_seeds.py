"""The demo's results over several training seeds: mean and range of every exact world metric per method.

    python benchmarks/demo_seeds.py [--seeds 0 1 2] [--quick] [--runs runs]

Runs ``pmrlhf demo --seed S --run-dir <runs>/demo-seed<S>`` for each seed (the world, hence the truth, is the same
for all; SFT, reward model, PPO and DPO are trained anew), reusing stages a seed's folder already finished, then
reads each ``eval/summary.json``. Prints a markdown table of mean [min, max] over the seeds and ends with one JSON
line of the same numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

COLUMNS = {
    "pm_divergence": ("sampled PM div.", None),
    "pm_divergence_uniform_pairs": ("exact PM div., uniform pairs", "world"),
    "pm_divergence_policy_pairs": ("exact PM div., π⊗π pairs", "world"),
    "tv_to_own_target": ("TV to own optimum", "world"),
    "tv_to_reward_model": ("TV to reward model", "world"),
    "tv_to_truth": ("TV to truth", "world"),
    "mass_outside_m": ("mass outside M(x)", "world"),
}


def run_seed(seed: int, runs: Path, quick: bool) -> dict:
    run_dir = runs / f"demo{'-quick' if quick else ''}-seed{seed}"
    args = [sys.executable, "-m", "pmrlhf", "demo", "--seed", str(seed), "--run-dir", str(run_dir)]
    subprocess.run([*args, *(["--quick"] if quick else [])], check=True, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "eval" / "summary.json").read_text())


def value(metrics: dict, key: str, where: str | None) -> float:
    return (metrics[where] if where else metrics)[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--quick", action="store_true", help="the quick demo")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder for the seeds' run folders")
    args = parser.parse_args()
    summaries = [run_seed(s, args.runs, args.quick) for s in args.seeds]
    methods = list(summaries[0])
    table: dict[str, dict[str, list[float]]] = {}
    for method in methods:
        table[method] = {}
        for key, (_, where) in COLUMNS.items():
            values = [value(s[method], key, where) for s in summaries]
            finite = [v for v in values if v == v]  # NaN where a method has no own optimum over M(x)
            table[method][key] = [statistics.fmean(finite), min(finite), max(finite)] if finite else []
    print(f"seeds {args.seeds}: mean [min, max]")
    print("| method | " + " | ".join(label for label, _ in COLUMNS.values()) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for method, row in table.items():
        cells = [f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" if v else "n/a" for v in row.values()]
        print(f"| {method} | " + " | ".join(cells) + " |")
    print(json.dumps({"seeds": args.seeds, "quick": args.quick, "mean_min_max": table}))


if __name__ == "__main__":
    main()
