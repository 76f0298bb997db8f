"""Figure helpers shared by every picture pmrlhf draws: headless backend, consistent look, atomic save."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# One parameter swept over several curves (p_ref, beta, alpha): ordered colours that stay readable in print.
SEQUENTIAL = plt.get_cmap("viridis")
# Methods side by side: colours told apart by hue, not by shade (20 of them, then they repeat).
_CATEGORICAL = plt.get_cmap("tab20")


def categorical(i: int):
    """The ``i``-th colour of a set of unrelated curves or bars: the dark hues of tab20 first, then the light."""
    return _CATEGORICAL((2 * i) % 20 + (i // 10) % 2)


def subplots(*args, **kwargs):
    """``plt.subplots`` with a grid and a tight layout, for figures read at a glance."""
    fig, ax = plt.subplots(*args, layout="constrained", **kwargs)
    for a in ax.flat if hasattr(ax, "flat") else [ax]:
        a.grid(alpha=0.3)
    return fig, ax


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Save as PNG through a temporary file, so a crash never leaves half a picture; close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
