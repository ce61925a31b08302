"""Our model against golden outputs of the original SR-DiT code (`srdit check-reference`).

The fixtures live outside the repository: ../shared/fixtures/reference relative to the repo root,
or wherever SRDIT_REFERENCE_FIXTURES points (for example a held-back set with other sizes).
"""
from __future__ import annotations

import os
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

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("SRDIT_REFERENCE_FIXTURES", REPO.parent / "shared" / "fixtures" / "reference"))

pytestmark = [
    pytest.mark.skipif(not (FIXTURES / "config.json").exists(),
                       reason=f"reference fixtures not found at {FIXTURES} (set SRDIT_REFERENCE_FIXTURES to the folder)"),
    pytest.mark.usefixtures("one_thread"),
]


def _has_time_grid() -> bool:
    try:
        from srdit.sample import time_grid  # noqa: F401
    except ImportError:
        return False
    return True


needs_time_grid = pytest.mark.skipif(not _has_time_grid(), reason="srdit.sample.time_grid is not written yet")



@pytest.mark.parametrize("float64", [False, True], ids=["float32", "float64"])
def test_model_matches_the_reference(float64):
    checks = check_reference(FIXTURES, float64=float64, time_grids=False)
    failed = [c for c in checks if not c.ok]
    assert not failed, failed
    cases = sorted(FIXTURES.glob("case*.safetensors"))
    assert len(cases) >= 3
    # every stored output of every case was compared, within the precision's tolerance
    for case in cases:
        outputs = {k for k in load_file(str(case)) if k.startswith("out.")}
        compared = {c.name for c in checks if c.group == case.name and not c.informational}
        assert outputs and outputs <= compared
    tolerance = FLOAT64_TOLERANCE if float64 else FLOAT32_TOLERANCE
    assert max(c.error for c in checks if c.name.startswith("out.")) <= tolerance
    # the intermediates (public set only) agree too, relative to their scale
    dbg = [c for c in checks if c.name.startswith("dbg.")]
    assert all(c.error <= tolerance for c in dbg)
    # the fixed tables
    tables = {c.name: c.error for c in checks if c.group == "tables"}
    assert tables["pos_embed"] == 0.0 and max(tables.values()) <= 1e-6


def test_the_tolerance_catches_a_subtle_mistake():
    """Exact GELU instead of the tanh approximation (~1e-4 relative) must fail in float32."""
    _, model, _ = load_reference_model(FIXTURES)
    for module in model.modules():
        if isinstance(module, torch.nn.GELU):
            module.approximate = "none"
    checks = run_case(model, FIXTURES / "case.safetensors", torch.float32, FLOAT32_TOLERANCE, torch.device("cpu"))
    assert any(not c.ok for c in checks if c.name == "out.velocity")


def test_cli_fails_on_a_wrong_mask_token(tmp_path):
    """The mask token is only visible through case_uncond and case_train_sparse."""
    folder = tmp_path / "fixtures"
    shutil.copytree(FIXTURES, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["mask_token"] = torch.zeros_like(weights["mask_token"])
    save_file(weights, str(folder / "model.safetensors"))
    out = subprocess.run([sys.executable, "-m", "srdit", "check-reference", str(folder)], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL" in out.stdout and "case_uncond.safetensors:out.velocity" in out.stdout
    assert "case.safetensors:out.velocity" not in out.stdout


@needs_time_grid
def test_time_grids_match():
    checks = check_time_grids(FIXTURES / "time_grid.safetensors")
    assert len(checks) >= 4 and all(c.ok for c in checks), checks


@needs_time_grid
def test_cli_passes():
    out = subprocess.run([sys.executable, "-m", "srdit", "check-reference", str(FIXTURES)], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS" in out.stdout and "out.velocity" in out.stdout
