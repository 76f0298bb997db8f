"""A study over seeds: every method's exact world metrics as a mean with a 95 % interval, the differences from the
standard-RLHF baseline that the seeds support, and the figures a reviewer asks for.

Reads only what ``pmrlhf eval`` wrote in each seed's run folder (``eval/summary.json``, ``eval/over_m.json``) and
the world's ``truth.json``. Seeds share the world, so the truth is one; each seed trains its own SFT and reward
model, so the seeds are paired: a difference between two methods is taken seed by seed.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from pmrlhf.data.world import World
from pmrlhf.evaluation.exact import family
from pmrlhf.evaluation.plots import SEQUENTIAL, save_figure, subplots
from pmrlhf.evaluation.report import REFERENCE

# the metrics of eval's ``world`` section a study reports, with their labels, and the paper's sampled one (Sec. 6.1)
METRICS = {
    "pm_divergence_uniform_pairs": "exact PM divergence",
    "pm_divergence_sampled": "sampled PM divergence",
    "own_target_pm_divergence_uniform_pairs": "its optimum's PM divergence",
    "mass_outside_m": "mass outside M(x)",
    "own_target_mass_outside_m": "its optimum's mass outside",
    "tv_to_own_target": "TV to own optimum",
    "tv_to_truth": "TV to truth",
    "tv_to_learnable": "TV to learnable",
    "minority_share": "minority's answers",
}


# the sampled metrics of eval's summary a study of the real-text world reports (``evaluation/realtext.py``)
REAL_METRICS = {
    "pm_divergence_sampled": "PM div. vs reward model",
    "pm_divergence_truth": "PM div. vs truth",
    "ref_perplexity": "reference perplexity",
    "words": "words",
    "sentiment": "sentiment",
    "minority_share": "minority's share",
    "minority_win_rate": "minority's win rate",
    "majority_win_rate": "majority's win rate",
}
# what a method's difference from its baseline is taken of, seed by seed
COMPARED = ("pm_divergence_uniform_pairs", "mass_outside_m", "pm_divergence_sampled")
REAL_COMPARED = ("pm_divergence_sampled", "pm_divergence_truth", "minority_share")


@functools.cache
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (``p > 1/2``) of Student's t with ``df`` degrees of freedom: bisection on its CDF, the
    density integrated from 0 by Simpson's rule on 4,000 intervals (within 1e-9 of the exact value for every df)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def above_half(t: float) -> float:  # P(0 < T < t)
        n, h = 4000, t / 4000
        weights = (1 if i in (0, n) else 4 if i % 2 else 2 for i in range(n + 1))
        return (
            h
            / 3
            * sum(w * math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i, w in enumerate(weights))
        )

    lo, hi = 0.0, 1.0
    while 0.5 + above_half(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 + above_half(mid) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Interval:
    """Mean of ``n`` values and the half-width of its 95 % t-interval (0 for one value)."""

    mean: float
    half: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Interval:
        values = [v for v in values if v == v]  # NaN: a metric a method does not have (no own optimum)
        if not values:
            return cls(math.nan, math.nan, 0)
        n = len(values)
        if n == 1:
            return cls(values[0], 0.0, 1)
        t = t_quantile(0.975, n - 1)
        return cls(statistics.fmean(values), t * statistics.stdev(values) / math.sqrt(n), n)

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def __str__(self) -> str:
        if self.n <= 1:  # one seed has no interval: a sample, not a result
            return "n/a" if self.n == 0 else f"{self.mean:.3f} (1 seed)"
        return f"{self.mean:.3f} ± {self.half:.3f}"


def minority_share(conditional: list[list[float]], world: World) -> float:
    """The probability, within M(x), a distribution gives the answers a minority prefers, averaged over the prompts
    that have such answers (NaN where none has)."""
    shares = [sum(conditional[i][j] for j in p.minority) for i, p in enumerate(world.prompts) if p.minority]
    return statistics.fmean(shares) if shares else math.nan


def seed_metrics(run_dir: Path, world: World) -> dict[str, dict]:
    """Per policy of one seed's run: its recorded objective and every metric of ``METRICS`` (``REAL_METRICS`` in
    the real-text world)."""
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    if world.config.kind == "realtext":
        return {
            name: {"objective": m["objective"], "metrics": {k: m.get(k, m["pm_divergence"]) for k in REAL_METRICS}}
            for name, m in summary.items()
        }
    over_m = json.loads((run_dir / "eval" / "over_m.json").read_text())
    out = {}
    for name, m in summary.items():
        row = {k: m["world"].get(k, math.nan) for k in METRICS}  # NaN: no estimate of its optimum off M(x)
        if family(m["objective"]) == "kl" and name != REFERENCE:
            row["own_target_mass_outside_m"] = m["world"].get("kl_target_mass_outside_m", math.nan)
        row["minority_share"] = minority_share(over_m[name], world)
        row["pm_divergence_sampled"] = m["pm_divergence"]
        out[name] = {"objective": m["objective"], "metrics": row}
    # what PM matches, what the labelers hold, and what pairwise training can learn of it
    for name in ("reward model", "ground truth", "learnable target"):
        if name not in over_m:  # written by an earlier version of eval
            continue
        out[name] = {"objective": {}, "metrics": {"minority_share": minority_share(over_m[name], world)}}
    return out


def baseline(objectives: dict[str, dict], method: str) -> str | None:
    """The standard-RLHF run a method is compared with: KL-penalised PPO at coefficient 1 and beta 1 for PPO, DPO's
    sigmoid loss at beta 1 for the DPO family; None if the study has none."""
    for name, o in objectives.items():
        if name == REFERENCE or o.get("method") != method:
            continue
        if method == "ppo" and family(o) == "kl" and o.get("beta") == 1 and o.get("coef") == 1:
            return name
        if method == "dpo" and o.get("loss") == "sigmoid" and o.get("beta") == 1:
            return name
    return None


def seed_values(seeds: dict[int, dict[str, dict]], name: str, key: str) -> list[float]:
    """One metric of one method, seed by seed (NaN where a seed lacks it)."""
    return [s[name]["metrics"].get(key, math.nan) if name in s else math.nan for s in seeds.values()]


def aggregate(seeds: dict[int, dict[str, dict]], real: bool = False) -> dict:
    """Every method's intervals over the seeds, and its seed-by-seed differences from its family's baseline;
    ``real``: of the real-text world's metrics."""
    names = list(next(iter(seeds.values())))
    objectives = {n: next(iter(seeds.values()))[n]["objective"] for n in names}
    keys, compared = (list(REAL_METRICS), REAL_COMPARED) if real else (list(METRICS), COMPARED)
    methods = {}
    for name in names:
        values = {k: seed_values(seeds, name, k) for k in keys}
        row = {"objective": objectives[name], "values": values}
        row["intervals"] = {k: Interval.of(v) for k, v in values.items()}
        base = baseline(objectives, objectives[name].get("method", ""))
        if base is not None and base != name:
            row["baseline"] = base
            row["differences"] = {
                k: Interval.of([a - b for a, b in zip(values[k], seed_values(seeds, base, k), strict=True)])
                for k in compared
            }
        methods[name] = row
    return {
        "seeds": list(seeds),
        "methods": methods,
        "metrics": REAL_METRICS if real else METRICS,
        "compared": compared,
    }


def meets_target(row: dict, kl: dict, outside: float = 0.10) -> bool:
    """Mass outside M(x) at most ``outside`` and exact PM divergence at most half the baseline's, both in the
    mean over seeds."""
    i, k = row["intervals"], kl["intervals"]
    return (
        i["mass_outside_m"].mean <= outside
        and i["pm_divergence_uniform_pairs"].mean <= k["pm_divergence_uniform_pairs"].mean / 2
    )


def table(study: dict) -> str:
    """Markdown: per method, every metric's mean ± 95 % half-width, and its difference from the baseline in the
    study's compared metrics (exact PM divergence and mass outside M(x) in a synthetic world), marked * where the
    paired interval excludes 0."""
    metrics, compared = study["metrics"], study["compared"]
    head = (
        "| method | "
        + " | ".join(metrics.values())
        + " | "
        + " | ".join(f"Δ {metrics.get(k, k)} vs baseline" for k in compared)
    )
    lines = [head + " |", "|---|" + "---|" * (len(metrics) + len(compared))]
    for name, row in study["methods"].items():
        cells = [str(row["intervals"][k]) for k in metrics]
        for k in compared:
            d = row.get("differences", {}).get(k)
            cells.append(
                "—"
                if d is None
                else f"{d.mean:+.3f}{f' ± {d.half:.3f}' if d.n > 1 else ''}{'*' if d.excludes_zero() else ''}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rule(objective: dict) -> str | None:
    """The conditional rule of a run (a ``cpm_*`` penalty or the cpm DPO loss), or None."""
    if family(objective) == "conditional":
        rule, advantage = objective["penalty"], objective.get("advantage", "gae")  # without the key: a GAE run
        return rule if advantage == "gae" else f"{rule}, {advantage}"
    if objective.get("method") == "dpo" and objective.get("alpha") is not None:
        return "dpo cpm"
    return None


def plot_alpha(study: dict, path: Path) -> Path:
    """Exact PM divergence against alpha, one line per conditional rule, the baselines as dashed lines."""
    fig, ax = subplots(figsize=(8.0, 4.2))
    rules: dict[str, list[tuple[float, Interval]]] = {}
    for row in study["methods"].values():
        rule = _rule(row["objective"])
        if rule is not None:
            rules.setdefault(rule, []).append(
                (row["objective"]["alpha"], row["intervals"]["pm_divergence_uniform_pairs"])
            )
    for c, (rule, points) in enumerate(sorted(rules.items())):
        points.sort(key=lambda point: point[0])  # one alpha may come twice (runs of other lengths): no tie-break
        ax.errorbar(
            [a for a, _ in points],
            [i.mean for _, i in points],
            yerr=[i.half for _, i in points],
            marker="o",
            capsize=3,
            label=rule,
            color=SEQUENTIAL(c / max(1, len(rules) - 1)),
        )
    baselines = [n for n, r in study["methods"].items() if n != REFERENCE and "differences" not in r and r["objective"]]
    for name, style in zip(baselines, ("--", ":", "-."), strict=False):
        ax.axhline(
            study["methods"][name]["intervals"]["pm_divergence_uniform_pairs"].mean, ls=style, c="grey", label=name
        )
    ax.set_xscale("log")
    ax.set_xlabel("α")
    ax.set_ylabel("exact PM divergence over M(x)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return save_figure(fig, path)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names of the points no other point beats on both coordinates (lower is better on each), by x."""
    front = [
        n
        for n, (x, y) in points.items()
        if not any((x2 <= x and y2 <= y) and (x2, y2) != (x, y) for x2, y2 in points.values())
    ]
    return sorted(front, key=lambda n: points[n])


def plot_tradeoff(study: dict, path: Path) -> Path:
    """Exact PM divergence against mass outside M(x), each method one point with its intervals, the front drawn."""
    fig, ax = subplots(figsize=(9.0, 6.0))
    points = {}
    for name, row in study["methods"].items():
        if not row["objective"]:
            continue
        x, y = row["intervals"]["mass_outside_m"], row["intervals"]["pm_divergence_uniform_pairs"]
        points[name] = (x.mean, y.mean)
        ax.errorbar(x.mean, y.mean, xerr=x.half, yerr=y.half, fmt="o", capsize=2, ms=4)
        ax.annotate(name, (x.mean, y.mean), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(points)
    ax.plot([points[n][0] for n in front], [points[n][1] for n in front], "k-", lw=1, label="Pareto front")
    ax.set_xscale("log")  # most methods keep 3-15 % outside M(x), PM all of it: a linear axis crowds them together
    ax.set_yscale("log")
    ax.set_xlabel("mass outside M(x)")
    ax.set_ylabel("exact PM divergence over M(x)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_minority(study: dict, truth: float, path: Path, learnable: float | None = None) -> Path:
    """Per method, the probability it gives the minority's answers within M(x), against the true share and the
    share of the labels' BTL fit (what a single Bradley-Terry model can learn)."""
    lines = ("ground truth", "learnable target")
    rows = [(n, r["intervals"]["minority_share"]) for n, r in study["methods"].items() if n not in lines]
    fig, ax = subplots(figsize=(7.2, 0.3 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [i.mean for _, i in rows], xerr=[i.half for _, i in rows], capsize=2, color="tab:blue")
    ax.axvline(truth, color="tab:red", label=f"true share {truth:.3f}")
    if learnable is not None:
        ax.axvline(learnable, color="tab:orange", linestyle="--", label=f"learnable from pairs {learnable:.3f}")
    ax.set_yticks(range(len(rows)), [n for n, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("probability of the minority's preferred answers, within M(x)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=2)  # below the axis, off the bars
    return save_figure(fig, path)


def plot_real(study: dict, path: Path) -> Path:
    """The real-text study in two panels, one bar per method with its interval: the sampled PM divergence against
    the reward model and against the truth, and the minority's share of the answers."""
    rows = [(n, r["intervals"]) for n, r in study["methods"].items()]
    fig, (left, right) = subplots(1, 2, figsize=(11.0, 0.35 * len(rows) + 1.8), sharey=True)
    y = range(len(rows))
    for shift, key, colour in ((-0.2, "pm_divergence_sampled", "tab:blue"), (0.2, "pm_divergence_truth", "tab:red")):
        left.barh(
            [i + shift for i in y],
            [r[key].mean for _, r in rows],
            height=0.4,
            xerr=[r[key].half for _, r in rows],
            capsize=2,
            color=colour,
            label=REAL_METRICS[key],
        )
    right.barh(
        y,
        [r["minority_share"].mean for _, r in rows],
        xerr=[r["minority_share"].half for _, r in rows],
        capsize=2,
        color="tab:green",
    )
    left.set_yticks(list(y), [n for n, _ in rows], fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("sampled PM divergence (lower: closer to matching)")
    right.set_xlabel("share of answers of at most 20 words (the minority's kind)")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    return save_figure(fig, path)
