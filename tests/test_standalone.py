"""A checkout stands alone: the golden fixtures are in it and intact, every citation of the recipe
points at docs/recipe.md (and at a section that exists), the paper rows of docs/recipe.md agree
with the registry, and no file names a path of some machine or a folder beside the checkout."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from golden import FIXTURES, checksum_problems

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "docs/recipe.md"

# A folder beside the checkout, or a path on a development machine (its work tree, a home
# folder); a placeholder such as /home/$USER is fine, and so are cluster paths in examples of a
# site config. (Written so that this file does not match itself.)
OUTSIDE_PATHS = re.compile(r"\.\./shared\b|(?<![\w.~-])/(?:work|home|root|Users)/(?![$<{])")
# the recipe (or a design/style note) cited as a file that is not the project's docs/recipe.md
SPEC_CITATION = re.compile(r"(?<![\w/.-])(?:recipe|design|style)\.md\b")
SECTION_CITATION = re.compile(r"docs/recipe\.md(?:#s|,? (?:section |§ ?)?)(\d+(?:\.\d+)?)")
_NOT_SCANNED = {".git", ".venv", "results", "resources", "logs", ".snakemake", "__pycache__", "build", "dist"}


def _project_files() -> list[Path]:
    """The files of the checkout: those git tracks, else (no git) a walk of the tree."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=REPO, capture_output=True, check=True)
        if Path(top.stdout.decode().strip()).resolve() != REPO.resolve():
            raise OSError("the checkout is not a git work tree of its own")
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode()
        files = [REPO / name for name in out.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for root, dirs, names in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in _NOT_SCANNED and not d.endswith(".egg-info")]
            files += [Path(root) / n for n in names]
    return [f for f in files if f.is_file()]


def _text_files() -> dict[str, str]:
    texts = {}
    for path in _project_files():
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue                                        # safetensors and other binary data
        try:
            texts[str(path.relative_to(REPO))] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    assert texts, "no project files found"
    return texts


def _matches(pattern: re.Pattern, texts: dict[str, str]) -> list[tuple[str, re.Match]]:
    """(file:line, match) for every match in every file."""
    return [(f"{name}:{text.count(chr(10), 0, m.start()) + 1}", m)
            for name, text in texts.items() for m in pattern.finditer(text)]


def _hits(pattern: re.Pattern, texts: dict[str, str]) -> list[str]:
    return [f"{where}: {m.group(0)}" for where, m in _matches(pattern, texts)]


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["reference", "invae"])
def test_golden_fixtures_ship_intact(name):
    folder = FIXTURES / name
    assert (folder / "SHA256SUMS").is_file(), f"{folder} lacks SHA256SUMS"
    assert not checksum_problems(folder), checksum_problems(folder)
    readme = (folder / "README.md").read_text()
    assert "SwayStar123/SpeedrunDiT" in readme and "c24c2ff25699cce63174ca56c2afcfeeb225e367" in readme


def test_checksums_catch_a_changed_file(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "SHA256SUMS").write_text("0" * 64 + "  config.json\n" + "0" * 64 + "  gone.bin\n")
    (folder / "extra.bin").write_bytes(b"x")
    assert checksum_problems(folder) == ["config.json: checksum differs from SHA256SUMS", "gone.bin: missing",
                                         "extra.bin: not in SHA256SUMS"]


# --------------------------------------------------------------------------------------------
# Paths and citations
# --------------------------------------------------------------------------------------------

def test_no_file_names_a_path_outside_the_repository():
    hits = _hits(OUTSIDE_PATHS, _text_files())
    assert not hits, "paths of a machine or beside the checkout:\n" + "\n".join(hits)


def test_the_recipe_is_cited_as_the_projects_own_file():
    hits = _hits(SPEC_CITATION, _text_files())
    assert not hits, "cite docs/recipe.md (with its section) or the paper:\n" + "\n".join(hits)


def _recipe_sections() -> set[str]:
    text = RECIPE.read_text()
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", text, re.M))
    anchors = set(re.findall(r'<a id="s(\d+(?:\.\d+)?)"></a>\n#{2,3} \1[. ]', text))
    assert headings == anchors, f"every numbered heading needs its anchor: {sorted(headings ^ anchors)}"
    return headings


def test_cited_recipe_sections_exist():
    sections = _recipe_sections()
    cited = _matches(SECTION_CITATION, _text_files())
    assert cited, "nothing cites docs/recipe.md by section"
    missing = [f"{where}: {m.group(0)}" for where, m in cited if m.group(1) not in sections]
    assert not missing, "citations of sections docs/recipe.md does not have:\n" + "\n".join(missing)
    registry = yaml.safe_load((REPO / "config" / "ablations.yaml").read_text())
    rows = {name: e["paper"]["row"].split()[0] for name, e in registry.items() if e.get("paper", {}).get("row")}
    assert rows and not {n: r for n, r in rows.items() if r not in sections}


# --------------------------------------------------------------------------------------------
# docs/recipe.md section 5 against the registry
# --------------------------------------------------------------------------------------------

METRICS = ("fid", "sfid", "is", "prec", "rec")


def _recipe_rows() -> dict[str, dict]:
    """Section 5's tables: registry name -> section, step, nfe, metrics, kdd, kdd_std."""
    text = RECIPE.read_text()
    rows, section = {}, None
    for line in text.splitlines():
        heading = re.match(r"#{2,3} (\d+(?:\.\d+)?)[. ]", line)
        if heading:
            section = heading.group(1)
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if len(cells) != 11 or not section or not section.startswith("5."):
            continue
        name = cells[0].strip("`")
        assert name not in rows, f"{name} appears twice in docs/recipe.md"
        values = [None if c == "–" else float(c) for c in cells[4:9]]
        kdd, _, kdd_std = cells[9].partition(" ± ")
        rows[name] = dict(section=section, step=int(cells[2].rstrip("K")) * 1000,
                          nfe=None if cells[3] == "–" else int(cells[3]), **dict(zip(METRICS, values)),
                          kdd=None if kdd == "–" else float(kdd), kdd_std=float(kdd_std) if kdd_std else None)
    return rows


def test_recipe_lists_every_paper_row_with_the_registrys_numbers():
    from srdit.config import inherited_meta

    registry = yaml.safe_load((REPO / "config" / "ablations.yaml").read_text())
    rows = _recipe_rows()
    paper_rows = [n for n in registry if inherited_meta(n, registry, "group") not in ("demo", "test")]
    assert len(paper_rows) >= 35
    assert sorted(rows) == sorted(paper_rows), "docs/recipe.md section 5 and config/ablations.yaml list other rows"
    for name in paper_rows:
        paper, doc = registry[name].get("paper") or {}, rows[name]
        if not paper:
            assert all(doc[k] is None for k in METRICS), f"{name}: the registry has no numbers for it"
            continue
        assert doc["section"] == paper["row"].split()[0], name
        assert (doc["step"], doc["nfe"]) == (paper["step"], paper["nfe"]), name
        for key in (*METRICS, "kdd", "kdd_std"):
            if doc[key] is not None or key != "kdd_std":      # the doc may leave out a logged kdd_std
                assert doc[key] == paper.get(key), f"{name} {key}: docs/recipe.md {doc[key]}, registry {paper.get(key)}"
