"""The core runs where Ray and MLflow are not installed (GPU boxes), and the CLI shell stays light (no torch)."""

import subprocess
import sys

CORE = ["l2t_dist", "l2t_dist.config", "l2t_dist.models", "l2t_dist.data", "l2t_dist.method", "l2t_dist.bilevel",
        "l2t_dist.sources.zoo", "l2t_dist.sources.colocated", "l2t_dist.train.local", "l2t_dist.train.build"]

BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('ray', 'mlflow'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_core_imports_without_ray_and_mlflow():
    code = BLOCK + "".join(f"import {m}\n" for m in CORE) + (
        "assert not any(m.split('.')[0] in ('ray', 'mlflow') for m in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_local_training_runs_without_ray_and_mlflow(tmp_path):
    code = BLOCK + (
        "from l2t_dist.cli import main\n"
        f"sys.exit(main(['train', '--quiet', 'method.name=scratch', 'optim.epochs=1', 'target.arch=resnet20',"
        f" 'data.path=task=c,classes=3,per_class=6,size=16', 'data.batch_size=6', 'run.out_dir={tmp_path}']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_help_does_not_import_torch():
    """`l2t-dist --help` and a config typo must answer without paying for torch's import."""
    code = ("import sys\n"
            "from l2t_dist.cli import build_parser\n"
            "build_parser().format_help()\n"
            "assert 'torch' not in sys.modules, 'the CLI shell must not import torch'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-m", "l2t_dist.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout, out.stderr
