"""Figures logged as MLflow artifacts: the λ heat-map (like Figure 4 of the L2T-ww paper) and
the learning curves. Drawn on an Agg canvas, never through pyplot, so no display is needed
and no global matplotlib backend is changed in the training process."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def parse_pair(name: str) -> tuple[str, str, str]:
    """`source:source_tap->target_tap` (method/pairs.py) as its three parts."""
    head, _, target_tap = name.partition("->")
    source, _, source_tap = head.partition(":")
    return source, source_tap, target_tap


def lambda_grids(pairs: dict[str, dict]) -> dict[str, tuple[list[str], list[str], list[list[float]]]]:
    """Per source: (source taps, target taps, λ matrix with NaN where no pair), taps in the
    order the pairs list them (shallow to deep)."""
    rows: dict[str, list[str]] = {}
    cols: list[str] = []
    values: dict[tuple[str, str, str], float] = {}
    for name, v in pairs.items():
        source, stap, ttap = parse_pair(name)
        rows.setdefault(source, [])
        if stap not in rows[source]:
            rows[source].append(stap)
        if ttap not in cols:
            cols.append(ttap)
        values[(source, stap, ttap)] = float(v.get("lambda", float("nan")))
    return {s: (taps, cols, [[values.get((s, r, c), float("nan")) for c in cols] for r in taps])
            for s, taps in rows.items()}


def lambda_heatmap(pairs: dict[str, dict], path: Path, title: str = "", centered: bool = False,
                   label: str = "mean λ (val batch)") -> Optional[Path]:
    """Mean λ per (source tap, target tap), one panel per source; None when there are no pairs.
    `centered` draws signed values (a change of λ) on a diverging scale around 0."""
    import numpy as np

    grids = lambda_grids(pairs)
    if not grids:
        return None
    finite = [x for _, _, m in grids.values() for row in m for x in row if math.isfinite(x)]
    vmax = max((abs(x) for x in finite), default=1.0) or 1.0
    vmin, cmap = (-vmax, "RdBu_r") if centered else (0.0, "viridis")
    n = len(grids)
    widest = max(len(c) for _, c, _ in grids.values())
    fig = _figure(1.6 + 1.1 * widest * n, 1.6 + 0.75 * max(len(r) for r, _, _ in grids.values()))
    axes = fig.subplots(1, n, squeeze=False)[0]
    image = None
    for ax, (source, (row_taps, col_taps, matrix)) in zip(axes, grids.items()):
        data = np.ma.masked_invalid(np.array(matrix, dtype=float))
        image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(col_taps)), col_taps, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(row_taps)), row_taps, fontsize=8)
        ax.set_xlabel("target tap")
        ax.set_ylabel(f"source {source} tap")
        ax.set_title(f"λ from {source}", fontsize=9)
        for i, row in enumerate(matrix):
            for j, x in enumerate(row):
                if math.isfinite(x):
                    dark = abs(x) > 0.6 * vmax if centered else x < 0.6 * vmax
                    ax.text(j, i, f"{x:+.2f}" if centered else f"{x:.2f}", ha="center", va="center",
                            fontsize=7, color="white" if dark else "black")
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label=label)
    return _save(fig, path, title)


def learning_curves(history: Sequence[dict], path: Path, title: str = "") -> Optional[Path]:
    """Training loss, and train/val/test accuracy, per epoch."""
    if not history:
        return None
    fig = _figure(9.0, 3.6)
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    loss_ax.plot(epochs, [r.get("train_loss") for r in history], marker="o", ms=3)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss")
    for key, label in (("train_acc", "train"), ("val_acc", "val"), ("test_acc", "test")):
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None and math.isfinite(r[key])]
        if pts:
            acc_ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy (%)")
    acc_ax.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path, title)


def _save(fig, path: Path, title: str) -> Path:
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
