"""l2t-dist: multi-source transfer learning with L2T-ww, one process or on Ray.

Kept import-light on purpose: `l2t-dist --help` must answer fast, and the core
(models, method, bilevel, data) must import without Ray or MLflow.
"""

__version__ = "0.1.0"
