"""The λ heat-map drawing (l2t_dist/tracking/plots.py): the grid it draws, and the signed
(change of λ) mode used by docs/results.md. Needs matplotlib only, no MLflow."""

import math

from matplotlib.image import imread  # matplotlib comes with mlflow, a dependency

from l2t_dist.tracking.plots import lambda_grids, lambda_heatmap

PAIRS = {"tin:block4->stage0": {"lambda": 0.5}, "tin:block4->stage1": {"lambda": -0.5},
         "tin:block9->stage1": {"lambda": 0.0}}


def test_grid_has_nan_where_no_pair():
    taps, cols, matrix = lambda_grids(PAIRS)["tin"]
    assert (taps, cols) == (["block4", "block9"], ["stage0", "stage1"])
    assert matrix[0] == [0.5, -0.5] and math.isnan(matrix[1][0]) and matrix[1][1] == 0.0


def test_signed_map_draws_opposite_hues(tmp_path):
    """On the diverging scale +0.5 and -0.5 get opposite hues (red and blue); the default
    0-based viridis scale has no red at all."""
    png = lambda_heatmap(PAIRS, tmp_path / "d.png", "change", centered=True, label="Δλ")
    img = imread(png)[..., :3]
    reds = ((img[..., 0] > 0.35) & (img[..., 2] < 0.25) & (img[..., 1] < 0.2)).sum()
    blues = ((img[..., 2] > 0.35) & (img[..., 0] < 0.25)).sum()
    assert reds > 100 and blues > 100, (reds, blues)


def test_no_pairs_draws_nothing(tmp_path):
    assert lambda_heatmap({}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
