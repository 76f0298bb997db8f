"""The paper's theory made concrete: Figs. 2 and 9, and numeric checks of Thms. 1-4, Prop. 3.7 and Sec. 5.1.

Everything here is computed from ``pmrlhf.objectives.optimal`` and ``fdivergence``: each closed form against the numeric
maximiser ``solve`` on random instances, and each of the paper's claims as a measured number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pmrlhf.evaluation.plots import SEQUENTIAL as _CMAP
from pmrlhf.evaluation.plots import save_figure, subplots
from pmrlhf.objectives import fdivergence as F
from pmrlhf.objectives import optimal as O


@dataclass
class Check:
    statement: str
    compared: str
    max_error: float
    expect_zero: bool  # True: the claim is that the two agree; False: that they differ

    @property
    def holds(self) -> bool:
        return self.max_error < 1e-6 if self.expect_zero else self.max_error > 1e-3


def _instances(seed: int, n: int = 64, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, k, generator=g, dtype=torch.float64) * 1.5
    ref = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2, -1)
    return r, ref


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def run_checks(seed: int = 0) -> list[Check]:
    """Every numeric check of the theory, on one seeded batch of random instances."""
    r, ref = _instances(seed)
    uniform = torch.full_like(ref, 1 / ref.shape[-1])
    pm = O.preference_matching(r)
    checks = [
        Check(
            "Thm. 1",
            "PM policy (3.2) vs numeric optimum of R = -log pi + C1 + C2/pi (C1 = 0.7, C2 = 1.3)",
            _gap(pm, O.solve(r, ref, O.pm_regularizer(0.7, 1.3))),
            True,
        ),
        Check(
            "Thm. 2",
            "PM policy vs numeric optimum with a response-dependent C2(x, y)",
            _gap(pm, O.solve(r, ref, lambda pi, rf: -torch.log(pi) + 2.0 * rf / pi)),
            True,
        ),
        Check(
            "Prop. 5.1",
            "closed form (5.1) vs numeric optimum of KL RLHF, beta = 0.5",
            _gap(O.kl_rlhf(r, ref, 0.5), O.solve(r, ref, O.kl_regularizer(0.5))),
            True,
        ),
        Check(
            "Prop. 3.7",
            "numeric optimum of KL RLHF, beta = 1, uniform reference, vs PM policy",
            _gap(O.solve(r, uniform, O.kl_regularizer(1.0)), pm),
            True,
        ),
        Check(
            "Prop. 3.7 (only if)",
            "numeric optimum of KL RLHF, beta = 1, non-uniform reference, vs PM policy (the bias)",
            _gap(O.solve(r, ref, O.kl_regularizer(1.0)), pm),
            False,
        ),
        Check(
            "Prop. 3.7 (only if)",
            "numeric optimum of KL RLHF, beta = 0.1, uniform reference, vs PM policy (the bias)",
            _gap(O.solve(r, uniform, O.kl_regularizer(0.1)), pm),
            False,
        ),
        Check(
            "Thm. 1 (only if)",
            "PM policy vs numeric optimum of R = -2 log pi (entropy at another temperature)",
            _gap(pm, O.solve(r, ref, O.max_entropy_regularizer(2.0))),
            False,
        ),
        Check(
            "Thm. 1 (only if)",
            "PM policy vs numeric optimum of R = -log pi - pi (not of the form -log pi + C1 + C2/pi)",
            _gap(pm, O.solve(r, ref, lambda pi, rf: -torch.log(pi) - pi)),
            False,
        ),
    ]
    for alpha in (0.1, 0.3, 0.5):
        closed = O.conditional_pm(r, ref, alpha)
        checks.append(
            Check(
                "Thm. 4",
                f"conditional PM closed form vs numeric optimum of (4.1), alpha = {alpha}",
                _gap(closed, O.solve(r, ref, O.conditional_pm_regularizer(alpha))),
                True,
            )
        )
        in_m = ref >= alpha
        numeric = O.solve(r, ref, O.conditional_pm_regularizer(alpha))
        on_m = torch.where(in_m, numeric, 0) / torch.where(in_m, numeric, 0).sum(-1, keepdim=True).clamp(min=1e-300)
        pl_m = torch.where(in_m, torch.exp(r), 0) / torch.where(in_m, torch.exp(r), 0).sum(-1, keepdim=True).clamp(
            min=1e-300
        )
        checks.append(
            Check(
                "Thm. 4",
                f"numeric optimum of (4.1) conditional on M(x) = {{ref >= {alpha}}} vs PL over M(x)",
                _gap(on_m, pl_m),
                True,
            )
        )
    # rewards in (-0.9, -0.1), where every generator's (f')^{-1} that eq. (5.3) evaluates is defined and positive
    r_53 = -0.1 - 0.8 * torch.rand(r[:, :2].shape, generator=torch.Generator().manual_seed(seed + 2), dtype=r.dtype)
    for name in sorted(F.F_DIVERGENCES):
        checks.append(
            Check(
                "Sec. 5.1",
                f"f-divergence RLHF ({name}) closed form vs numeric optimum, beta = 0.5",
                _gap(
                    F.f_divergence_rlhf(r, ref, 0.5, name),
                    O.solve(r, ref, F.f_divergence_regularizer(0.5, name)),
                ),
                True,
            )
        )
        checks.append(
            Check(
                "Sec. 5.1" + ("" if name == "reverse_kl" else " (only if)"),
                f"f-divergence RLHF ({name}) vs PM policy, beta = 1, uniform reference",
                _gap(F.f_divergence_rlhf(r, uniform, 1.0, name), pm),
                name == "reverse_kl",
            )
        )
        pi2 = F.f_divergence_rlhf(r_53, ref[:, :2], 1.0, name)
        checks.append(
            Check(
                "Eq. (5.3) (as stated)",
                f"binary preference of the f-divergence optimum ({name}) vs eq. (5.3), beta = 1",
                _gap(pi2[:, 0] / pi2.sum(-1), F.eq_5_3_binary(r_53, ref[:, :2], 1.0, name)),
                name == "reverse_kl",
            )
        )
    rp = torch.rand(r.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) * 2 + 0.5
    families: dict[str, tuple[Callable, Callable, Callable, float]] = {
        "exp(r/2)": (lambda u: torch.exp(u / 2), lambda p: 2 * torch.log(p), lambda u: 2 * torch.exp(u / 2), 0.0),
        "r": (lambda u: u, lambda p: p, lambda u: u**2 / 2, 0.0),
        "r^2": (lambda u: u**2, torch.sqrt, lambda u: u**3 / 3, 0.0),
        "1 + e^r": (lambda u: 1 + torch.exp(u), lambda p: torch.log(p - 1), lambda u: u + torch.exp(u), 1.0),
    }
    for gname, (g, g_inv, G, g_inf) in families.items():
        target = O.generalized_pl(rp, g)
        if g_inf == 0:  # eq. (3.14) evaluates g^{-1}(pi), undefined for pi < g_inf
            checks.append(
                Check(
                    "Thm. 3 (as stated)",
                    f"generalised PL, g = {gname}, vs optimum of eq. (3.14)",
                    _gap(target, O.solve(rp, uniform, O.thm3_regularizer(g_inv, G))),
                    gname.startswith("exp"),
                )
            )
        scale = g(rp).sum(-1, keepdim=True)
        checks.append(
            Check(
                "Thm. 3 (corrected)",
                f"generalised PL, g = {gname}, vs optimum of the S(x)-aware regulariser",
                _gap(target, O.solve(rp, uniform, O.generalized_pm_regularizer(g_inv, scale, g_inf))),
                True,
            )
        )
    return checks


def _binary_rlhf(p_reward: torch.Tensor, p_ref: float, beta: float) -> torch.Tensor:
    """p_rlhf(y1) from eq. (5.1) on two responses whose reward preference is ``p_reward`` (before beta)."""
    dr = torch.logit(p_reward)
    r = torch.stack([dr, torch.zeros_like(dr)], -1)
    ref = torch.tensor([p_ref, 1 - p_ref], dtype=r.dtype).expand_as(r)
    pi = O.kl_rlhf(r, ref, beta)
    return pi[..., 0] / pi.sum(-1)


_PM_STYLE = {"lw": 2.5, "color": "black", "ls": "--", "zorder": 3}


def _binary_figure(
    path: Path, curves: list[tuple[str, float, float, bool]], xlabel: str, title: str, mark_x: float | None = None
) -> Path:
    """p_rlhf(y1) against the reward model's preference, one curve per ``(label, p_ref, beta, is_pm)``."""
    x = torch.linspace(1e-4, 1 - 1e-4, 401, dtype=torch.float64)
    fig, ax = subplots(figsize=(5.5, 5))
    for i, (label, p_ref, beta, is_pm) in enumerate(curves):
        style = _PM_STYLE if is_pm else {"lw": 1.4, "color": _CMAP(i / (len(curves) - 1))}
        ax.plot(x, _binary_rlhf(x, p_ref, beta), label=label, **style)
    if mark_x is not None:
        ax.axvline(mark_x, color="grey", ls=":", lw=1)
    ax.set(xlabel=xlabel, ylabel="KL RLHF model's preference p_rlhf(y1)", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)


def figure_2(path: Path) -> Path:
    """Fig. 2: the KL-RLHF model's preference against the reward model's, beta = 1, several p_ref."""
    curves = [
        (f"p_ref = {p:g}" + (" (PM)" if p == 0.5 else "") + (" (collapse)" if p in (0, 1) else ""), p, 1.0, p == 0.5)
        for p in (0.0, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0)
    ]
    return _binary_figure(
        path,
        curves,
        "reward model's preference p_reward(y1)",
        "Fig. 2: KL RLHF inherits the reference's bias (beta = 1)",
    )


def figure_9(path: Path) -> Path:
    """Fig. 9: uniform reference, beta != 1: the smaller beta, the stronger the amplification of the majority."""
    curves = [(f"beta = {b:g}" + (" (PM)" if b == 1 else ""), 0.5, b, b == 1) for b in (0.1, 0.25, 0.5, 1.0, 2.0)]
    return _binary_figure(
        path,
        curves,
        "reward model's preference sigmoid(r1 - r2)",
        "Fig. 9: bias from beta (uniform reference)",
        mark_x=0.7,
    )


def checks_markdown(checks: list[Check]) -> str:
    lines = [
        "| statement | what is compared | max abs difference | claim | holds |",
        "|---|---|---|---|---|",
    ]
    for c in checks:
        claim = "equal" if c.expect_zero else "differ"
        lines.append(f"| {c.statement} | {c.compared} | {c.max_error:.2e} | {claim} | {'yes' if c.holds else 'NO'} |")
    return "\n".join(lines)


def write_theory_report(out: Path, seed: int = 0) -> Path:
    """Write ``fig2.png``, ``fig9.png`` and ``theory.md`` into ``out``; return the markdown's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figure_2(out / "fig2.png")
    figure_9(out / "fig9.png")
    checks = run_checks(seed)
    text = f"""# The theory, checked numerically

Each closed form of `pmrlhf.objectives.optimal` is compared with the numeric maximiser `solve` of
`sum_i pi_i (r_i + R(pi_i))` over the simplex (eq. (3.5) / (3.12)) on 64 random prompts with 5 responses
each (seed {seed}). "equal" rows should show rounding-level differences; "differ" rows are the paper's
negative statements, measured.

{checks_markdown(checks)}

**Thm. 3.** Eq. (3.14) is preference-matching only for exponential g (the PL model and its temperature
scalings). Its derivation in App. B.1 writes `r_i = g^-1(pi_i) + c`, which needs `g^-1(pi S) = h(pi) + c(S)`.
For other g a PM regulariser has to know the reward model's normaliser `S(x) = sum_y g(r(x, y))`:
`R(pi) = -(1/pi) int_0^pi g^-1(S t) dt` (`optimal.generalized_pm_regularizer`; for g bounded below by
`g_inf > 0`, such as `1 + e^r`, the integral starts at `g_inf / S`, and eq. (3.14), which evaluates `g^-1(pi)`,
is not even defined).

**Eq. (5.3).** The binary preference the paper gives for f-divergence RLHF is not that of the optimum for any f
but reverse KL: the optimum `pi_i = ref_i (f')^-1((r_i - mu) / beta)` keeps the multiplier `mu`, which cancels
from `pi_1 / pi_2` only when `(f')^-1` is exponential. For chi^2 with `r = (1, 0)`, a uniform reference and
`beta = 1` the optimum prefers y1 with 0.625, eq. (5.3) says 0.600. The paper's conclusion, that such RLHF is
not preference-matching unless f is the KL, holds for the true optimum (the "Sec. 5.1 (only if)" rows).

Rows marked "(only if)" check the converse of a statement: that the property fails where the paper says it
needs its condition. Every row compares two independently computed quantities (a closed form or a claim
against the numeric maximiser `solve`), so each could fail.

![Fig. 2](fig2.png)

![Fig. 9](fig9.png)
"""
    path = out / "theory.md"
    path.write_text(text)
    return path
