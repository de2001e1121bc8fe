"""What a sweep prints and draws: the trials table and the val-accuracy scatter PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from l2t_dist.tune.space import SearchSpace

LOG_DISTS = ("loguniform", "qloguniform", "lograndint")


def _labels(keys: list[str]) -> dict[str, str]:
    """Short column names: the last part of the key unless two keys share it (meta.lr, optim.lr)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _acc(v: Optional[float]) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def format_table(rows: list[dict], keys: list[str]) -> str:
    """One line per trial, best val first."""
    labels = _labels(keys)
    head = ["trial", *labels.values(), "epochs", "best val", "test@best", "status"]
    body = [[r["trial_id"], *(_fmt(r["params"].get(k)) for k in keys), str(r["epochs"]),
             _acc(r["best_val_acc"]), _acc(r["test_acc_at_best_val"]), r["status"]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


def _axes(space: SearchSpace) -> tuple[Optional[str], Optional[str]]:
    """x, y keys of the scatter: β and T when searched, else the first numeric parameters."""
    def numeric(k):
        p = space.params[k]
        return p.dist != "choice" or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p.args)

    keys = [k for k in space.params if numeric(k)]
    preferred = [k for k in ("method.beta", "method.T") if k in keys]
    ordered = preferred + [k for k in keys if k not in preferred]
    return (ordered[0] if ordered else None), (ordered[1] if len(ordered) > 1 else None)


def plot_val_acc(rows: list[dict], space: SearchSpace, path: Path, title: str) -> Optional[Path]:
    """Scatter of the trials over (x, y), colour = best val accuracy; None when nothing to draw."""
    xk, yk = _axes(space)
    if xk is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    scored = [r for r in rows if r["best_val_acc"] is not None and r["params"].get(xk) is not None]
    failed = [r for r in rows if r not in scored and r["params"].get(xk) is not None]
    ys = (lambda r: r["params"].get(yk)) if yk else (lambda r: r["best_val_acc"] or 0.0)
    if scored:
        sc = ax.scatter([r["params"][xk] for r in scored], [ys(r) for r in scored],
                        c=[r["best_val_acc"] for r in scored], cmap="viridis", s=70, edgecolors="black",
                        marker="o")
        fig.colorbar(sc, ax=ax, label="best val accuracy (%)")
        for r in scored:
            if r["status"] == "stopped early":
                ax.annotate(f"stop@{r['epochs']}", (r["params"][xk], ys(r)), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
    if failed:
        ax.scatter([r["params"][xk] for r in failed], [ys(r) for r in failed], c="red", marker="x", s=60,
                   label="failed")
        ax.legend(loc="best")
    if space.params[xk].dist in LOG_DISTS:
        ax.set_xscale("log")
    if yk and space.params[yk].dist in LOG_DISTS:
        ax.set_yscale("log")
    ax.set_xlabel(xk)
    ax.set_ylabel(yk or "best val accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
