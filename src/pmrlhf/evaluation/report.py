"""The markdown report a person reads: the paper's Table 3 layout, PM-divergence histograms and CDFs, the
collapse probe, and in the synthetic world a bar chart per prompt of truth, reward model and every policy.

Reads only the files ``pmrlhf eval`` and ``pmrlhf probe`` wrote; every sentence of findings is computed
from those numbers, whichever way they come out.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pmrlhf.config import read_json
from pmrlhf.evaluation.exact import family, objective_coef
from pmrlhf.evaluation.plots import categorical, save_figure, subplots
from pmrlhf.io import atomic_write_text

REFERENCE = "reference (SFT)"


def _load(path: Path):
    return read_json(path, f"run the stage that writes {path.parent.name}/ again") if path.is_file() else None


def _method(metrics: dict) -> str:
    """The method that trained a policy (``objective.json``): ppo or dpo."""
    return metrics["objective"]["method"]


def _is_kl(metrics: dict) -> bool:
    """The standard-RLHF baseline of a family: KL-penalised PPO, or DPO itself (its loss ``sigmoid``)."""
    objective = metrics["objective"]
    return family(objective) == "kl" if _method(metrics) == "ppo" else objective.get("loss") == "sigmoid"


def _per_token(metrics: dict) -> bool:
    """Whether a run is the rule the paper's real-model claim is about: PPO with its code's per-token condition."""
    return _method(metrics) == "ppo" and metrics["objective"].get("penalty") == "cpm_token"


def _temperature(metrics: dict) -> float:
    """The temperature of a run's optimum over the reward model's score: coef * beta for PPO, beta for DPO."""
    return objective_coef(metrics["objective"]) * metrics["beta"]


def comparison_table(summary: dict) -> str:
    """Rows: methods; columns as in Table 3 (PM divergence, length, perplexity, entropy, KL), then the
    synthetic world's exact columns when present."""
    world = any("world" in m for m in summary.values())
    head = "| method | beta | PM divergence | length | perplexity | entropy | KL |"
    rule = "|---|---|---|---|---|---|---|"
    if world:
        head += (
            " exact PM div., uniform pairs | exact PM div., π⊗π pairs | TV to own optimum | TV to reward model |"
            " TV to truth | mass outside M(x) |"
        )
        rule += "---|---|---|---|---|---|"
    lines = [head, rule]
    for name, m in summary.items():
        row = (
            f"| {name} | {m['beta']:g} | {m['pm_divergence']:.4f} | {m['length']:.2f} | {m['perplexity']:.3f} | "
            f"{m['entropy']:.3f} | {m['kl']:.3f} |"
        )
        if world:
            w = m["world"]
            own = w["tv_to_own_target"]
            row += (
                f" {w['pm_divergence_uniform_pairs']:.4f} | {w['pm_divergence_policy_pairs']:.4f} | "
                f"{'n/a' if math.isnan(own) else f'{own:.3f}'} | {w['tv_to_reward_model']:.3f} | "
                f"{w['tv_to_truth']:.3f} | {w['mass_outside_m']:.3f} |"
            )
        lines.append(row)
    return "\n".join(lines)


def _change(new: float, old: float) -> str:
    if old == 0:
        return "n/a"
    pct = 100 * (old - new) / old
    return f"{pct:.0f} % lower" if pct >= 0 else f"{-pct:.0f} % higher"


def findings(summary: dict, probe: dict | None, reward_model: dict | None = None) -> list[str]:
    """Plain statements from the numbers: what was and was not reproduced."""
    out = []
    if reward_model is not None:
        out.append(
            "**The reward model** against the truth: its preference between two responses of M(x), "
            "σ(r_θ(y1) − r_θ(y2)), is off the labelers' by "
            f"{reward_model['pair_gap_to_truth']:.3f} on average over every pair. The methods below match the "
            "reward model, not the truth; this gap is what separates the two."
        )
        if "pair_gap_to_learnable" in reward_model:
            out[-1] += (
                f" From the Bradley–Terry fit that pairwise training converges to with unlimited labels, it is off by "
                f"{reward_model['pair_gap_to_learnable']:.3f}: the rest is what one such model cannot represent of "
                "labelers who are a mixture of groups."
            )
    trained = {n: m for n, m in summary.items() if n != REFERENCE}
    baselines: dict[str, tuple[str, dict]] = {}
    for method in ("ppo", "dpo"):
        runs = {n: m for n, m in trained.items() if _is_kl(m) and _method(m) == method}
        if runs:
            baselines[method] = min(runs.items(), key=lambda kv: abs(_temperature(kv[1]) - 1))
    others = {n: m for n, m in trained.items() if not _is_kl(m)}
    for method, (kl_name, kl) in baselines.items():
        if "world" not in kl:
            continue
        w = kl["world"]
        if method == "ppo":
            what, closed, unbiased = "KL RLHF", w["tv_to_kl_target"], w["tv_to_reward_model"]
            reward = "r the reward model's score"
        else:  # DPO never sees the reward model: its closed form is over the labels' own Bradley-Terry fit
            what, closed, unbiased = "DPO", w["tv_to_own_target"], w["tv_to_learnable"]
            reward = "r the Bradley–Terry fit of its comparisons' labels, as DPO never sees the reward model"
        out.append(
            f"**{what} follows the reference's bias** ({kl_name}): its preferences over M(x) are at total variation "
            f"{closed:.3f} from its closed form ref·e^(r/β) (eq. 5.1) and {unbiased:.3f} from e^r, with {reward}. "
            + ("Reproduced." if closed < unbiased else "Not reproduced: it ended closer to e^r.")
        )
    for name, m in others.items():
        if _method(m) not in baselines:
            continue
        kl_name, kl = baselines[_method(m)]
        text = (
            f"**{name}** vs {kl_name}: sampled PM divergence {m['pm_divergence']:.4f} vs {kl['pm_divergence']:.4f} "
            f"({_change(m['pm_divergence'], kl['pm_divergence'])}"
            + ("; the paper reports 29-41 % lower for its per-token rule on real models)" if _per_token(m) else ")")
        )
        if "world" in m and "world" in kl:
            w, wk = m["world"], kl["world"]
            text += (
                f"; exact PM divergence over M(x) {w['pm_divergence_uniform_pairs']:.4f} vs "
                f"{wk['pm_divergence_uniform_pairs']:.4f} "
                f"({_change(w['pm_divergence_uniform_pairs'], wk['pm_divergence_uniform_pairs'])}); TV to the truth "
                f"{w['tv_to_truth']:.3f} vs {wk['tv_to_truth']:.3f}; mass outside M(x) {w['mass_outside_m']:.3f} "
                f"vs {wk['mass_outside_m']:.3f}"
            )
        out.append(text + ".")
    pm = {n: m for n, m in others.items() if family(m["objective"]) == "pm" and "world" in m}
    cpm = {n: m for n, m in others.items() if family(m["objective"]) == "conditional" and "world" in m}
    if pm and cpm:
        worst_pm = max(m["world"]["mass_outside_m"] for m in pm.values())
        worst_cpm = max(m["world"]["mass_outside_m"] for m in cpm.values())
        out.append(
            f"**Unnatural text**: unconditional PM puts up to {worst_pm:.3f} of its mass outside M(x), conditional PM "
            f"at most {worst_cpm:.3f}. "
            + (
                "This is the paper's reason for the conditional variant (Sec. 4)."
                if worst_pm > worst_cpm
                else "Not reproduced: conditional PM leaks as much."
            )
        )
    own = {n: m["world"]["tv_to_own_target"] for n, m in summary.items() if n != REFERENCE and "world" in m}
    if own:
        parts = ", ".join(f"{n} {v:.3f}" if not math.isnan(v) else f"{n} n/a" for n, v in own.items())
        left = [n for n, m in summary.items() if n in own and m["world"]["mass_outside_m"] > 0.9]
        out.append(
            f"**Convergence** (TV over M(x) to each run's own optimum): {parts}. A run far from its own optimum "
            "has not finished optimising its objective, and its distance to the reward model says little about "
            "the objective itself. A DPO-family run's optimum is the population one, as infinitely many "
            "comparisons would give it; fitted to finitely many, a run ends at their empirical optimum, off by "
            "their sampling error."
            + (
                f" {', '.join(left)} put more than 90 % of their mass outside M(x): what little stays inside is "
                "no distribution to compare."
                if left
                else ""
            )
        )
    ties = [n for n, m in summary.items() if "pm_divergence" in m]
    if ties:
        out.append(
            "A note on the sampled PM divergence: when a policy samples the same response twice the "
            "instance divergence is "
            "0, so a collapsed policy scores well on it"
            + (
                ", as it does on the exact one over π⊗π pairs. The exact divergence over uniform pairs of M(x) has no "
                "such blind spot; where they disagree, trust that one."
                if any("world" in m for m in summary.values())
                else ": read it beside the entropy, which such a policy lowers."
            )
        )
    if probe is not None:
        by = probe["collapse_rate_by_length_difference"]
        parts = ", ".join(f"{k}: {v['collapse_rate']:.2f} ({v['pairs']} pairs)" for k, v in by.items())
        out.append(
            f"**Collapse probe**: {probe['collapse_rate']:.3f} of reference-sampled pairs have p_ref <= 0.01 "
            f"or >= 0.99 "
            f"(reward model: {probe['reward_collapse_rate']:.3f}). By length difference in tokens: {parts}."
        )
    return out


def figure_pm_divergence(instances: dict, path: Path) -> tuple[Path, str]:
    """Histogram and CDF of each method's instance PM divergence over its sampled pairs, on a log axis (most pairs
    lie near 0); with the caption that says what to look for and how many pairs each curve holds."""
    fig, (h, c) = subplots(1, 2, figsize=(12, 4.2))
    values = {n: sorted(v["pm_divergence"]) for n, v in instances.items()}
    positive = [x for v in values.values() for x in v if x > 0]
    low, top = (min(positive), max(positive)) if positive else (1e-4, 1.0)
    low = max(low, top * 1e-6)
    bins = torch.logspace(math.log10(low), math.log10(top), 31).tolist()
    for i, (name, vals) in enumerate(values.items()):
        h.hist([max(x, low) for x in vals], bins=bins, histtype="step", lw=1.6, label=name, color=categorical(i))
        cdf = [(k + 1) / len(vals) for k in range(len(vals))]
        c.step([max(x, low) for x in vals], cdf, where="post", lw=1.6, color=categorical(i))
    h.set(xscale="log", xlabel="instance PM divergence (log)", ylabel="sampled pairs", title="Histogram")
    c.set(xscale="log", xlabel="instance PM divergence (log)", ylabel="share of pairs <= x", title="CDF")
    fig.legend(fontsize=7, loc="outside right center")
    counts = sorted({len(v) for v in values.values()})
    zeros = {n: sum(x <= 0 for x in v) for n, v in values.items()}
    caption = (
        f"Instance PM divergence of each method's sampled pairs ({'/'.join(map(str, counts))} pairs per method). "
        "A curve further left, and a CDF that rises sooner, matches the reward model better."
    )
    if any(zeros.values()):
        caption += (
            " Pairs of one response drawn twice score 0 and are drawn at the left edge: "
            + ", ".join(f"{n} {z}" for n, z in zeros.items() if z)
            + "."
        )
    return save_figure(fig, path), caption


def figure_probe(pairs: dict, probe: dict, path: Path) -> tuple[Path, str]:
    """The paper's Figs. 3-4: the reference's and the reward model's preferences on reference-sampled pairs, and
    the collapse rate by length difference, each bar with its number of pairs; with its caption."""
    fig, (a, b, c) = subplots(1, 3, figsize=(14, 4))
    bins = torch.linspace(0, 1, 21).tolist()
    a.hist(pairs["p_ref"], bins=bins, color="tab:gray")
    a.set(xlabel="p_ref(y1 | y1, y2, x)", ylabel="sampled pairs", title="(a) reference model's preferences")
    b.hist(pairs["p_reward"], bins=bins, color="tab:blue")
    b.set(xlabel="p_reward(y1 | y1, y2, x)", ylabel="sampled pairs", title="(b) reward model's preferences")
    by = probe["collapse_rate_by_length_difference"]
    bars = c.bar(list(by), [v["collapse_rate"] for v in by.values()], color="tab:red")
    c.bar_label(bars, [f"{v['pairs']} pairs" for v in by.values()], fontsize=7)
    c.set(
        xlabel="|len(y1) - len(y2)| (tokens)",
        ylabel="share with p_ref <= 0.01 or >= 0.99",
        title="(c) collapse rate by length difference",
        ylim=(0, 1.1),
    )
    same = sum(d == 0 and abs(p - 0.5) < 1e-9 for d, p in zip(pairs["length_difference"], pairs["p_ref"], strict=True))
    caption = (
        f"{len(pairs['p_ref'])} pairs sampled from the reference. Collapse shows as mass at 0 and 1 in (a) where (b) "
        f"is spread: the reference is sure where the labelers are not. {same} pairs are one response drawn twice "
        "(p = 0.5 exactly, the spike in the middle). The bars in (c) hold the pairs counted on them."
    )
    return save_figure(fig, path), caption


def figure_over_m(over_m: dict, truth_path: Path, path: Path, max_prompts: int = 12) -> tuple[Path, str]:
    """Per prompt, the probability each method, the reward model and the truth give every answer of M(x); with
    its caption."""
    truth = read_json(truth_path, f"remove {truth_path.parent} for the run to write its world again")["prompts"]
    n = min(max_prompts, len(truth))
    cols = 4
    rows = math.ceil(n / cols)
    fig, axes = subplots(rows, cols, figsize=(4 * cols, 2.8 * rows + 1.2), squeeze=False)
    fixed = {"ground truth": "black", "learnable target": "tab:gray", "reward model": "tab:blue"}
    names = [*(n for n in fixed if n in over_m), *[k for k in over_m if k not in fixed]]
    colours = {name: fixed.get(name) or categorical(j + 1) for j, name in enumerate(names)}  # 0 is the blue
    width = 0.8 / len(names)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        p = truth[i]
        k = len(p["responses"])
        for j, name in enumerate(names):
            ax.bar([x + j * width for x in range(k)], over_m[name][i][:k], width, label=name, color=colours[name])
        ax.set_xticks([x + 0.4 - width / 2 for x in range(k)], [f"{w}w" for w in p["words"]], fontsize=7)
        ax.set_title(f"{p['prompt']} ({p['profile']})", fontsize=9)
        ax.set_ylim(0, 1)
    axes.flat[0].set_ylabel("probability within M(x)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncol=min(len(names), 6))
    shown = f"the first {n} of {len(truth)} prompts" if n < len(truth) else f"all {n} prompts"
    caption = (
        f"Preferences over the meaningful answers M(x), {shown} (x-axis: each answer's length in words). Where a "
        "method's bars follow the reward model's (blue) it matches preferences; where they follow the short answers "
        "the reference favours, it inherits the reference's bias. Black is the labelers' truth."
    )
    return save_figure(fig, path), caption


EXACT_COLUMNS = (
    ". In the synthetic world the exact columns use every response in M(x) with teacher-forced probabilities. Two "
    "exact PM divergences: over *uniform pairs*, every pair of distinct responses in M(x) weighs the same, so it "
    "asks whether the policy's preferences match the reward model's whatever it samples; over *π⊗π pairs*, pairs "
    "are weighed by the policy's own probabilities within M(x), identical pairs included (they score 0), which is "
    "Sec. 6.1's population value without sampling and without the pairs outside M(x). A policy collapsed onto "
    "one answer scores near 0 on the second and high on the first. *TV to own optimum* is the total variation "
    "over M(x) from the optimum of the objective the run optimised, with its own coefficient, clip and rule "
    "(did training converge?); *TV to reward model* from the reward model's Plackett-Luce distribution (does "
    "the method match preferences?); *mass outside M(x)* is the probability of unnatural text."
)


def write_report(
    run_dir: str | Path, eval_name: str = "eval", probe_name: str = "probe", out_name: str = "report"
) -> Path:
    run = Path(run_dir)
    out = run / out_name
    summary = _load(run / eval_name / "summary.json")
    if summary is None:
        raise ValueError(f"no {run / eval_name / 'summary.json'}: run `pmrlhf eval` first")
    instances = _load(run / eval_name / "instances.json") or {}
    probe, pairs = _load(run / probe_name / "summary.json"), _load(run / probe_name / "pairs.json")
    over_m = _load(run / eval_name / "over_m.json")
    sections = [
        "# Preference matching vs KL RLHF: results",
        f"Run folder: `{run}`. Every number below is read from `{eval_name}/summary.json` and "
        f"`{probe_name}/summary.json`. It is one training seed: a sample, whose numbers move with the seed (and with "
        "the thread count, which changes the order of floating-point sums); `pmrlhf sweep` trains several and gives "
        "each number an interval.",
        "## Comparison (layout of the paper's Table 3)",
        "PM divergence, length, perplexity, entropy and KL are the Sec. 6.1 metrics on pairs sampled from each policy"
        + (EXACT_COLUMNS if any("world" in m for m in summary.values()) else ", against the reward model."),
        comparison_table(summary),
        "## Findings",
        "\n".join(f"- {f}" for f in findings(summary, probe, _load(run / eval_name / "reward_model.json"))),
    ]
    if instances:
        _, caption = figure_pm_divergence(instances, out / "pm_divergence.png")
        sections += [
            "## PM divergence per sampled pair",
            "![PM divergence histogram and CDF](pm_divergence.png)",
            caption,
        ]
    if probe and pairs:
        _, caption = figure_probe(pairs, probe, out / "probe.png")
        sections += ["## Is preference collapse happening? (Figs. 3-4)", "![probe](probe.png)", caption]
    truth_path = run / "world" / "truth.json"
    if over_m and truth_path.is_file():
        _, caption = figure_over_m(over_m, truth_path, out / "over_m.png")
        sections += ["## Preferences over M(x), per prompt", "![over M(x)](over_m.png)", caption]
    path = atomic_write_text(out / "report.md", "\n\n".join(sections) + "\n")
    return path


def headline(path: Path) -> str:
    """The comparison table and the findings of the report at ``path``, for the terminal."""
    text = Path(path).read_text()
    table = text.split("## Comparison", 1)[1].split("## Findings", 1)[0]
    findings = text.split("## Findings", 1)[1].split("\n## ", 1)[0]
    return "\n".join(line for line in table.splitlines() if line.startswith("|")) + "\n" + findings.rstrip() + "\n"
