"""Where the golden fixtures recorded from the original SR-DiT code live: tests/fixtures/ in this
repository, one folder per set, each with a README.md (how it was recorded: the original
repository and commit, seeds, tolerances) and a SHA256SUMS.

An environment variable can point the tests at another set in the same format (for example one
recorded with other sizes). A fixture folder that is missing is an error, never a skip: these
are the checks against the original implementation.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def fixture_dirs(name: str, env: str) -> list[Path]:
    """The folders named in $env (os.pathsep-separated), else FIXTURES/name."""
    folders = [Path(d) for d in os.environ.get(env, "").split(os.pathsep) if d] or [FIXTURES / name]
    missing = [str(f) for f in folders if not (f / "config.json").is_file()]
    if missing:
        fix = f"unset {env} to use" if os.environ.get(env) else "restore from git"
        raise FileNotFoundError(f"golden fixture folder(s) without config.json: {', '.join(missing)}; "
                                f"{fix} the '{name}' set the repository ships in {FIXTURES / name}")
    return folders


def fixture_dir(name: str, env: str) -> Path:
    """The one folder of a set (see `fixture_dirs`)."""
    folders = fixture_dirs(name, env)
    if len(folders) != 1:
        raise ValueError(f"${env} names {len(folders)} folders; these tests take one")
    return folders[0]


def checksum_problems(folder: Path) -> list[str]:
    """What is wrong with `folder` against its SHA256SUMS: files that differ, are missing, or
    are not listed (every file but README.md and SHA256SUMS must be). Empty when all is well."""
    listed = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            listed[name.lstrip("*")] = digest
    problems = []
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"{name}: checksum differs from SHA256SUMS")
    unlisted = sorted(p.name for p in folder.iterdir()
                      if p.is_file() and p.name not in listed and p.name not in ("README.md", "SHA256SUMS"))
    problems += [f"{name}: not in SHA256SUMS" for name in unlisted]
    return problems
