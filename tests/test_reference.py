"""Our model against golden outputs of the original SR-DiT code (`srdit check-reference`).

The fixtures ship in tests/fixtures/reference (its README says how they were recorded from the
original code). SRDIT_REFERENCE_FIXTURES (os.pathsep-separated folders) runs every test on other
sets in the same format instead, for example one recorded with other sizes.
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
import torch
from safetensors.torch import load_file, save_file

from srdit.reference import (
    FLOAT32_TOLERANCE, FLOAT64_TOLERANCE, check_reference, check_time_grids, load_reference_model, run_case,
)

from golden import FIXTURES, fixture_dirs

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=fixture_dirs("reference", "SRDIT_REFERENCE_FIXTURES"), ids=lambda p: p.name)
def fixture_set(request) -> Path:
    return request.param


@pytest.mark.parametrize("float64", [False, True], ids=["float32", "float64"])
def test_model_matches_the_reference(fixture_set, float64):
    checks = check_reference(fixture_set, float64=float64, time_grids=False)
    failed = [c for c in checks if not c.ok]
    assert not failed, failed
    cases = sorted(fixture_set.glob("case*.safetensors"))
    assert len(cases) >= 3
    # every stored output of every case was compared, within the precision's tolerance
    for case in cases:
        outputs = {k for k in load_file(str(case)) if k.startswith("out.")}
        compared = {c.name for c in checks if c.group == case.name and not c.informational}
        assert outputs and outputs <= compared
    tolerance = FLOAT64_TOLERANCE if float64 else FLOAT32_TOLERANCE
    assert max(c.error for c in checks if c.name.startswith("out.")) <= tolerance
    # the intermediates (optional in the format) agree too, relative to their scale
    dbg = [c for c in checks if c.name.startswith("dbg.")]
    assert all(c.error <= tolerance for c in dbg)
    # the fixed tables
    tables = {c.name: c.error for c in checks if c.group == "tables"}
    assert tables["pos_embed"] == 0.0 and max(tables.values()) <= 1e-6


def test_the_tolerance_catches_a_subtle_mistake(fixture_set):
    """Exact GELU instead of the tanh approximation (~1e-4 relative) must fail in float32."""
    _, model, _ = load_reference_model(fixture_set)
    for module in model.modules():
        if isinstance(module, torch.nn.GELU):
            module.approximate = "none"
    checks = run_case(model, fixture_set / "case.safetensors", torch.float32, FLOAT32_TOLERANCE, torch.device("cpu"))
    assert any(not c.ok for c in checks if c.name == "out.velocity")


def test_cli_fails_on_a_wrong_mask_token(fixture_set, tmp_path):
    """The mask token is only visible through case_uncond and case_train_sparse."""
    folder = tmp_path / "fixtures"
    shutil.copytree(fixture_set, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["mask_token"] = torch.zeros_like(weights["mask_token"])
    save_file(weights, str(folder / "model.safetensors"))
    out = subprocess.run([sys.executable, "-m", "srdit", "check-reference", str(folder)], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL" in out.stdout and "case_uncond.safetensors:out.velocity" in out.stdout
    assert "case.safetensors:out.velocity" not in out.stdout


def test_time_grids_match(fixture_set):
    checks = check_time_grids(fixture_set / "time_grid.safetensors")
    assert len(checks) >= 4 and all(c.ok for c in checks), checks


def _readme_command() -> list[str]:
    """The command of the README's "Checking against the original implementation" section."""
    section = (REPO / "README.md").read_text().split("## Checking against the original implementation", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def test_cli_passes(fixture_set):
    """The README's command exactly as written, run from the repository root (on a set named by
    $SRDIT_REFERENCE_FIXTURES: the same command with that folder)."""
    command = _readme_command()
    assert command[:4] == ["python", "-m", "srdit", "check-reference"], command
    if fixture_set == FIXTURES / "reference":
        assert (REPO / command[4]).resolve() == fixture_set.resolve(), "the README must check the shipped set"
    else:
        command[4] = str(fixture_set)
    out = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS" in out.stdout and "out.velocity" in out.stdout


def test_cli_names_the_shipped_set_when_the_folder_is_wrong(tmp_path, capsys):
    from srdit.cli import main

    assert main(["check-reference", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'config.json'} is missing" in err and "tests/fixtures/reference" in err
