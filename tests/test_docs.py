"""The docs checked against the code, so they cannot rot.

- Every `l2t-dist ...` command in a fenced shell block of README.md and docs/*.md (also the
  `docker run IMAGE ...` and `python -m l2t_dist.cli ...` forms) parses with the real
  argparse parser; its job file exists and, with its overrides, validates (no training).
  Files the commands name (jobs/, tune_spaces/, benchmarks/) exist.
- docs/jobs.md is the generator's output (l2t_dist/schema_docs.py).
- Every error message in docs/troubleshooting.md still occurs in the code.
- The dataset layouts in docs/real_data.md are the readers' own.
- `l2t-dist --help`, `--version` and every sub-command's `--help` run as a user runs them.
- The documented commands that only read (`job`, `sources inspect`) are run as written and
  must succeed (or fail with the documented error); those that train are run in their own
  forms by the tests of each part: test_train_local (train --backend local), test_distributed_ray
  (--backend ray), test_tune (tune), test_tracking (models), test_demo (demo).
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from l2t_dist import __version__, cli
from l2t_dist.config import DATA_KINDS, load_job
from l2t_dist.errors import ConfigError
from l2t_dist.models.names import check_arch

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console", ""}
# Files that commands name and that must exist.
REFERENCED = re.compile(r"^(?:jobs|tune_spaces|benchmarks)/[\w./-]+\.(?:ya?ml|py|sh)$")

# Placeholders the docs use in commands, and a value that each stands for when a command is
# checked. A new placeholder in the docs must be added here (the test says so).
SHELL_VARS = {"PWD": "/tmp", "SEED": "0", "METHOD": "l2t_ww", "OUT": "/tmp/out", "HOME": "/tmp"}
TOKEN_VALUES = {
    "method.name=M": "method.name=fm",       # docs/results.md: M in scratch, fm, l2t_ww
    "data.per_class=N": "data.per_class=25",  # docs/results.md: N images per class
    "run.seed=S": "run.seed=0",
    "JOB.yaml": "jobs/cifar10_limited.yaml",
    "JOB": "jobs/cifar10_limited.yaml",
}


@dataclass
class Command:
    where: str                 # file:line
    argv: list[str]            # arguments after `l2t-dist`
    output: list[str] = field(default_factory=list)  # console blocks: the lines printed

    def __str__(self) -> str:
        return f"{self.where}: l2t-dist {shlex.join(self.argv)}"


def fenced_blocks(path: Path):
    """(language, first line number, lines) of every fenced block."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        lang, start, body = m.group(1).lower(), i + 2, []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        yield lang, start, body
        i += 1


def logical_lines(lang: str, start: int, body: list[str]):
    """(line number, command text, output lines) with backslash continuations joined.
    In console blocks only `$ ` lines are commands; the lines after one are its output."""
    out: list = []
    i = 0
    while i < len(body):
        line, number = body[i], start + i
        if lang == "console":
            if not line.startswith("$ "):
                if out:
                    out[-1][2].append(line)
                i += 1
                continue
            line = line[2:]
        while line.rstrip().endswith("\\") and i + 1 < len(body):
            i += 1
            line = line.rstrip()[:-1] + " " + body[i].strip()
        out.append((number, line.strip(), []))
        i += 1
    return out


def _substitute(token: str, where: str) -> str:
    token = TOKEN_VALUES.get(token, token)

    def var(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        assert name in SHELL_VARS, f"{where}: add the placeholder ${name} to SHELL_VARS in tests/test_docs.py"
        return SHELL_VARS[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", var, token)


def _invocation(tokens: list[str]) -> list[str] | None:
    """The arguments given to l2t-dist, or None when the line does not run it."""
    for i, t in enumerate(tokens):
        if t in ("l2t-dist", ".venv/bin/l2t-dist"):
            return tokens[i + 1:]
        if t in ("python", "python3", ".venv/bin/python") and tokens[i + 1:i + 3] == ["-m", "l2t_dist.cli"]:
            return tokens[i + 3:]
    if tokens[:2] == ["docker", "run"] and "--entrypoint" not in tokens:
        for i, t in enumerate(tokens):
            if re.fullmatch(r"l2t-dist:[\w.-]+", t):  # the image: its entry point is l2t-dist
                return tokens[i + 1:]
    return None


def _cut(args: list[str]) -> list[str]:
    for i, t in enumerate(args):
        if t in ("|", "||", "&&", ";", "&") or t.startswith((">", "<", "2>")):
            return args[:i]
    return args


def collect() -> tuple[list[Command], list[tuple[str, str]]]:
    """Commands that run l2t-dist, and (where, path) of every file that a command names."""
    commands, files = [], []
    for path in DOC_FILES:
        rel = path.relative_to(ROOT).as_posix()
        for lang, start, body in fenced_blocks(path):
            if lang not in SHELL_LANGS:
                continue
            for number, text, output in logical_lines(lang, start, body):
                where = f"{rel}:{number}"
                if not text or text.startswith("#"):
                    continue
                try:
                    tokens = shlex.split(text, comments=True)
                except ValueError:
                    assert "l2t-dist" not in text and "l2t_dist.cli" not in text, f"{where}: cannot split {text!r}"
                    continue
                for t in tokens:
                    for candidate in {t, t.split("=", 1)[-1]}:
                        if REFERENCED.match(candidate) and (where, candidate) not in files:
                            files.append((where, candidate))
                args = _invocation(tokens) if tokens else None
                if args is not None:
                    argv = [_substitute(a, where) for a in _cut(args)]
                    commands.append(Command(where, argv, output))
    return commands, files


COMMANDS, FILES = collect()


def _parse(argv: list[str]) -> argparse.Namespace | None:
    """The CLI's own parsing (overrides may follow options); None for --help/--version."""
    parser = cli.build_parser()
    parse = getattr(cli, "_parse", None)
    try:
        return parse(parser, argv) if parse else parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:
            return None
        raise AssertionError(f"does not parse (exit {exc.code}); see the usage message above") from None


def test_the_docs_have_commands():
    assert len(COMMANDS) >= 20, [str(c) for c in COMMANDS]
    readme = ROOT / "README.md"
    # .ci/run calls `make test`: the README's two set-up commands must stay as they are.
    setup = [line.split("#")[0].strip() for lang, _, body in fenced_blocks(readme) if lang == "bash" for line in body]
    assert "make demo" in setup and "make test" in setup


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_parses_and_its_job_validates(command: Command, monkeypatch):
    monkeypatch.chdir(ROOT)  # jobs/... in the docs are relative to the checkout
    args = _parse(command.argv)
    if args is None:
        return
    if getattr(args, "arch", None) is not None:
        check_arch(args.arch)  # built-in, tv:NAME or timm:NAME
    if getattr(args, "data", None):
        assert args.data.partition(":")[0] in DATA_KINDS, f"{command}: unknown data kind in --data {args.data!r}"
    if args.command not in ("train", "job", "tune") or getattr(args, "resume", None) \
            or getattr(args, "schema_md", False):
        return
    job, overrides = cli._job_and_overrides(args)
    if job is not None:
        assert (ROOT / job).is_file(), f"{command}: job file {job} does not exist"
    expected = [line for line in command.output if line.strip()]
    if expected and expected[0].startswith("error:"):
        with pytest.raises(ConfigError) as err:
            load_job(job, overrides)
        assert ("error: " + str(err.value)).splitlines() == expected, f"{command}: the documented output differs"
    else:
        load_job(job, overrides)


READ_ONLY = [c for c in COMMANDS if c.argv[:1] == ["job"] or c.argv[:2] == ["sources", "inspect"]]


@pytest.mark.parametrize("command", READ_ONLY, ids=[c.where for c in READ_ONLY])
def test_read_only_documented_commands_run(command: Command, monkeypatch, capsys):
    from conftest import shared_path

    monkeypatch.chdir(ROOT)
    if any("../shared" in a for a in command.argv) and shared_path() is None:
        pytest.skip("the command reads ../shared, which is absent here")
    code = cli.main(list(command.argv))
    out, err = capsys.readouterr()
    expected = [line for line in command.output if line.strip()]
    if expected and expected[0].startswith("error:"):
        assert code == 2, f"{command}: documented as an error, exited {code}"
    else:
        assert code == 0, f"{command}: exit {code}\n{err}"
        assert out.strip(), f"{command}: printed nothing"


@pytest.mark.parametrize("where,path", FILES, ids=[f"{w}:{p}" for w, p in FILES])
def test_files_named_in_commands_exist(where: str, path: str):
    assert (ROOT / path).is_file(), f"{where}: {path} does not exist"


def test_relative_links_point_to_files():
    broken = []
    for path in DOC_FILES:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"^[a-z]+://|^mailto:", target) and not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to files that do not exist: {broken}"


# ---- docs/jobs.md is generated
def test_jobs_md_is_up_to_date():
    from l2t_dist.schema_docs import render

    current = (ROOT / "docs" / "jobs.md").read_text()
    assert current == render(), ("docs/jobs.md is out of date with l2t_dist/config.py; regenerate it with\n"
                                 "    python -m l2t_dist.schema_docs > docs/jobs.md")


def test_every_job_key_has_a_meaning():
    from l2t_dist.schema_docs import FALLBACK_DESCRIPTIONS, documented_keys

    keys = documented_keys()
    missing = [k for k, meaning in keys.items() if not meaning]
    assert not missing, f"give these keys a Field(description=...) in l2t_dist/config.py: {missing}"
    stale = [k for k in FALLBACK_DESCRIPTIONS if k not in keys]
    assert not stale, f"FALLBACK_DESCRIPTIONS in l2t_dist/schema_docs.py names keys that no longer exist: {stale}"


def test_schema_md_flag_prints_the_reference(capsys):
    from l2t_dist.schema_docs import render

    assert cli.main(["job", "--schema-md"]) == 0
    assert capsys.readouterr().out == render()


# ---- docs/troubleshooting.md: each message exists in the code
def _code_strings() -> list[str]:
    """Every string literal under l2t_dist/, implicit concatenations joined (as the parser
    does) and each f-string field replaced by NUL."""
    out = []
    for path in (ROOT / "l2t_dist").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                out.append("".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append(node.value)
    return out


def message_fragments(text: str) -> list[str]:
    """The literal pieces of the documented messages: `…` stands for a value, and a piece is
    also cut at `: ` and `; ` (messages are assembled from such parts)."""
    pieces = []
    for lang, _, body in fenced_blocks(ROOT / "docs" / "troubleshooting.md"):
        if lang != "text":
            continue
        for line in body:
            line = line.removeprefix("error: ")
            for piece in re.split(r"…|: |; ", line):
                piece = piece.strip(" \t.,:;'\"()`-")
                if sum(c.isalpha() for c in piece) >= 2:
                    pieces.append(piece)
    return pieces


def test_troubleshooting_messages_exist_in_the_code():
    strings = _code_strings()
    pieces = message_fragments((ROOT / "docs" / "troubleshooting.md").read_text())
    assert len(pieces) > 50
    missing = [p for p in pieces if not any(p in s for s in strings)]
    assert not missing, f"docs/troubleshooting.md shows messages the code no longer gives: {missing}"


def test_troubleshooting_covers_the_situations():
    text = (ROOT / "docs" / "troubleshooting.md").read_text().lower()
    for heading in ("typo", "missing or malformed dataset", "checkpoint that does not fit", "unknown tap",
                    "nan", "unreachable ray cluster", "unreachable mlflow", "cannot be placed"):
        assert heading in text, heading


# ---- docs/real_data.md: the layouts are the readers'
def test_real_data_layouts_are_the_readers():
    from l2t_dist.data.registry import expected_layout

    text = (ROOT / "docs" / "real_data.md").read_text()
    blocks = ["\n".join(body) for lang, _, body in fenced_blocks(ROOT / "docs" / "real_data.md") if lang == "text"]
    for kind in DATA_KINDS:
        assert f"`{kind}`" in text
        assert expected_layout(kind).rstrip() in blocks, f"docs/real_data.md: the layout of {kind} differs from " \
                                                         f"the reader's LAYOUT"


# ---- the command line as a user runs it
def _exe() -> list[str]:
    script = Path(sys.executable).parent / "l2t-dist"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "l2t_dist.cli"]


def _subcommands(parser: argparse.ArgumentParser, prefix=()) -> list[tuple[str, ...]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((*prefix, name))
                out.extend(_subcommands(sub, (*prefix, name)))
    return out


HELP_ARGS = [(), *_subcommands(cli.build_parser())]


@pytest.mark.parametrize("words", HELP_ARGS, ids=[" ".join(w) or "l2t-dist" for w in HELP_ARGS])
def test_help_runs(words):
    proc = subprocess.run([*_exe(), *words, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: l2t-dist"), proc.stdout[:200]


def test_version_runs():
    proc = subprocess.run([*_exe(), "--version"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == f"l2t-dist {__version__}", proc.stdout + proc.stderr
