"""Every command of the README runs as written.

Each `snakemake` command (in a code block, or inline in backticks) runs verbatim plus `-n` in a
copy of the workflow where the README's one-time edits are made: `data.source` of the paper
configs points at a folder (empty: a dry run only needs it to exist), and the ablation of "Adding
an ablation" is added through `extra_registries`, as the README allows. Every other shell command
runs too where it can here (`srdit info`, `srdit check-reference`, `srdit status`, `srdit launch`
with `--dry-run`), or is checked as far as this machine allows (`make -n`, `--help`, the conda
file's pins against the Makefile's). A command this file does not know fails the suite, so a new
README command must be given a check here.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from workflow_copy import copy_workflow, decoy_env

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = Path(sys.executable).parent
SHELL_LANGS = ("bash", "sh", "shell", "console", "")
# srdit commands that run here as written, and those that need the internet or GPUs (only parsed)
SRDIT_RUN = ("info", "check-reference", "status", "plan", "prune")
SRDIT_PARSE = ("verify-release", "fetch")
# `snakemake --report` needs a finished run: tests/test_slurm.py builds one and runs it there
NEEDS_RESULTS = ("--report",)
# Slurm's clients: the read-only ones run here where a cluster answers; scancel is only parsed
SLURM_READ = ("squeue", "sinfo", "sacct")
SLURM_WRITE = ("scancel",)


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line number) of every fenced code block, indented ones included."""
    blocks = []
    for match in re.finditer(r"^([ \t]*)```([\w+-]*)[ \t]*\n(.*?)^\1```[ \t]*$", text, re.M | re.S):
        indent = match.group(1)
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line
                         for line in match.group(3).splitlines())
        blocks.append((match.group(2).lower(), body, text[:match.start()].count("\n") + 1))
    return blocks


def shell_commands(text: str) -> list[tuple[list[str], int]]:
    """The commands of the shell code blocks (continuations joined, comments dropped) and every
    inline `snakemake ...` span, as word lists with their README line."""
    commands = []
    for lang, body, line in code_blocks(text):
        if lang not in SHELL_LANGS:
            continue
        joined = re.sub(r"\\\n", " ", body)
        for offset, raw in enumerate(joined.splitlines()):
            words = shlex.split(raw, comments=True)
            if words:
                commands.append((words, line + 1 + offset))
    without_blocks = re.sub(r"^([ \t]*)```.*?^\1```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.M | re.S)
    for match in re.finditer(r"`(snakemake [^`]+)`", without_blocks):
        commands.append((shlex.split(match.group(1)), without_blocks[:match.start()].count("\n") + 1))
    return commands


TEXT = README.read_text()
COMMANDS = shell_commands(TEXT)
SNAKEMAKE = [(w, n) for w, n in COMMANDS if w[0] == "snakemake" and not set(w) & set(NEEDS_RESULTS)]
OTHERS = [(w, n) for w, n in COMMANDS if w[0] != "snakemake"]


def _id(item) -> str:
    words, line = item
    return f"L{line}:" + " ".join(words)[:80]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A copy of the workflow after the README's one-time edits."""
    work = copy_workflow(tmp_path_factory.mktemp("readme"))
    (work / "tests").symlink_to(REPO / "tests")
    imagenet = work / "imagenet-train"
    imagenet.mkdir()
    # "Adding an ablation": the README's entry, in a registry of one's own (extra_registries)
    entry = next(body for lang, body, _ in code_blocks(TEXT) if lang == "yaml" and "parent:" in body)
    (work / "my_ablations.yaml").write_text(entry)
    for name in ("imagenet256.yaml", "imagenet512.yaml"):
        path = work / "config" / name
        text, count = re.subn(r"^(\s+source:)\s*\S+", rf"\1 {imagenet}", path.read_text(), count=1, flags=re.M)
        assert count == 1, f"config/{name} has no data.source line to edit as the README says"
        text, count = re.subn(r"^extra_registries:.*$", "extra_registries: [my_ablations.yaml]", text,
                              count=1, flags=re.M)
        assert count == 1, f"config/{name} has no extra_registries line"
        path.write_text(text)
    return work


def _env() -> dict:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_the_readme_has_the_commands_this_file_checks():
    assert len(SNAKEMAKE) >= 8, SNAKEMAKE
    assert any("weights" in w for w, _ in SNAKEMAKE)
    assert any(w[0] == "srdit" and w[1] == "status" for w, _ in OTHERS)
    # --configfile must not swallow a target: in every command naming one, the file comes with "="
    for words, line in SNAKEMAKE:
        if "--configfile" in words:
            i = words.index("--configfile")
            later = [w for w in words[i + 2:] if not w.startswith("-")]
            assert not later, f"README line {line}: {' '.join(words)} reads {later} as config files"


@pytest.mark.parametrize("item", SNAKEMAKE, ids=_id)
def test_snakemake_command_runs_as_written(item, work):
    words, line = item
    result = _run([str(BIN / "snakemake"), *words[1:], "-n"], work)
    assert result.returncode == 0, (f"README line {line}: `{' '.join(words)} -n` failed\n"
                                    f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    assert "Nothing to be done" in result.stdout + result.stderr or re.search(
        r"^total\s+\d+$", result.stdout + result.stderr, re.M), result.stdout[-2000:]


def _makefile_pins() -> dict[str, str]:
    return dict(re.findall(r"\b([A-Za-z0-9_.-]+)==([0-9][\w.]*)", (REPO / "Makefile").read_text()))


@pytest.mark.parametrize("item", OTHERS, ids=_id)
def test_other_command_runs_or_parses(item, work):
    words, line = item
    where = f"README line {line}: {' '.join(words)}"
    if words[:3] == ["python", "-m", "srdit"]:
        words = ["srdit", *words[3:]]
    head = words[0]
    if head == "srdit":
        sub = words[1] if len(words) > 1 else ""
        if sub == "launch":
            cmd = [*words[:3], "--dry-run", *words[3:]]        # resolve everything, submit nothing
        elif sub in SRDIT_RUN:
            cmd = words
        elif sub in SRDIT_PARSE:
            cmd = [*words[:2], "--help"]
        else:
            pytest.fail(f"{where}: no check for `srdit {sub}` in tests/test_readme.py; add one")
        result = _run([sys.executable, "-m", "srdit", *cmd[1:]], work)
        assert result.returncode == 0, f"{where}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        if sub == "launch":
            assert "srdit launch: command " in result.stdout, result.stdout
    elif head == "make":
        result = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{where}\n{result.stderr}"
    elif head == "python" and words[1].startswith("benchmarks/"):
        result = _run([sys.executable, words[1], "--help"], REPO, timeout=120)
        assert result.returncode == 0, f"{where}\n{result.stderr[-2000:]}"
    elif head in SLURM_READ + SLURM_WRITE:
        assert not any(w.startswith("<") for w in words[1:]) or head in SLURM_WRITE, f"{where}: a placeholder"
        if head in SLURM_READ and shutil.which(head):
            result = subprocess.run(words, capture_output=True, text=True, timeout=60)
            assert "invalid option" not in result.stderr and "unrecognized option" not in result.stderr, \
                f"{where}\n{result.stderr}"
    elif head == "pytest" or words[:3] == ["python", "-m", "pytest"]:
        paths = [w for w in words[1:] if w.startswith("tests/")]
        result = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", *paths], REPO, timeout=300)
        assert result.returncode == 0, f"{where}\n{result.stdout[-2000:]}"
    elif head == "bash" and words[1].startswith("ci/"):
        assert (REPO / words[1]).is_file(), where
    elif head == "source":
        assert words[1:] == [".venv/bin/activate"], where
        assert re.search(r"^VENV\s*:?=\s*\.venv$", (REPO / "Makefile").read_text(), re.M), \
            "the Makefile's venv is not .venv/"
    elif words[:3] == ["conda", "env", "create"]:
        env_file = REPO / words[words.index("-f") + 1]
        spec = yaml.safe_load(env_file.read_text())
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
        pins = dict(p.split("==") for p in pip if "==" in p)
        for package in ("torch", "torchvision", "deepspeed"):
            assert pins.get(package) == _makefile_pins().get(package), \
                f"{env_file.name}: {package} {pins.get(package)} but the Makefile pins {_makefile_pins().get(package)}"
        assert any(p.startswith("--editable ..") for p in pip), "the conda env must install this checkout"
    elif words[:2] == ["conda", "activate"]:
        envs = [yaml.safe_load(p.read_text())["name"] for p in (REPO / "envs").glob("*.yaml")]
        assert words[2] in envs, where
    else:
        pytest.fail(f"{where}: no check for this command in tests/test_readme.py; add one")


def test_python_blocks_compile():
    blocks = [(body, line) for lang, body, line in code_blocks(TEXT) if lang == "python"]
    assert blocks
    for body, line in blocks:
        compile(body, f"README.md:{line}", "exec")


def test_rules_run_the_venv_python_without_an_activated_venv(tmp_path):
    """`.venv/bin/snakemake` with the venv off PATH: the jobs still run the venv's python. A
    `python` and a `torchrun` that only fail stand first on PATH, so a rule that called either by
    its bare name would fail here."""
    (tmp_path / "work").mkdir()
    work = copy_workflow(tmp_path / "work")
    env = decoy_env(tmp_path)
    result = subprocess.run([str(BIN / "snakemake"), "--profile", "profiles/local", "--cores", "1",
                             "--configfile=config/test_slurm.yaml", "results/demo_images"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert len(list((work / "results/demo_images").rglob("*.JPEG"))) >= 16
    # the job's command names the venv's interpreter by its path
    assert re.search(rf"{re.escape(str(BIN))}/python[\d.]* -m srdit demo-data", result.stdout + result.stderr)
