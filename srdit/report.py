"""`srdit report`: the ablation table (CSV + Markdown, ours beside the paper's numbers), FID-vs-step
curves and sample grids, from the metrics JSON files the workflow's evaluate jobs wrote.

Each evaluated checkpoint enters as one `--item NAME STEP METRICS_JSON GRID_PNG`; the registry
gives the row its group, description and the paper's numbers (the `paper:` key, docs/recipe.md
section 5). Points that sample the same training run with the same sampler settings (for example
b1_srdit and its 50K/100K/200K checkpoints) form one curve of the FID-vs-step plot.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from srdit.config import get_config, inherited_meta, load_registry

# Our metric name -> keys under which an evaluate JSON may hold it (top level or under "metrics").
METRICS = {
    "fid": ("fid",),
    "sfid": ("sfid",),
    "is": ("is", "inception_score"),
    "prec": ("precision", "prec"),
    "rec": ("recall", "rec"),
    "kdd": ("kdd",),
    "kdd_std": ("kdd_std",),
}
TRAINING_GRID = "training_images.png"
HEADERS = {"fid": "FID", "sfid": "sFID", "is": "IS", "prec": "Prec", "rec": "Rec", "kdd": "KDD",
           "kdd_std": "KDD std"}




@dataclass
class Row:
    name: str
    step: int
    group: str
    description: str
    nfe: int
    tag: str
    run: str
    ours: dict[str, float | None]
    paper: dict = field(default_factory=dict)
    grid: Path | None = None
    random_weights: bool = False
    tokenizer: str = "e2e-invae"


def read_metrics(path: Path) -> tuple[dict[str, float | None], bool]:
    """Our metric values from an evaluate JSON, and whether it says the weights were random."""
    data = json.loads(Path(path).read_text())
    pools = [data] + [data[k] for k in ("metrics", "results") if isinstance(data.get(k), dict)]
    out: dict[str, float | None] = {}
    for metric, keys in METRICS.items():
        out[metric] = None
        for pool in pools:
            hits = [pool[k] for k in keys if isinstance(pool.get(k), (int, float))]
            if hits:
                out[metric] = float(hits[0])
                break
    if out["fid"] is None:
        raise ValueError(f"{path}: no FID in this metrics file (looked for 'fid' at the top level and "
                         f"under 'metrics'); is it the output of `srdit evaluate`?")
    text = json.dumps(data).lower()
    random = any(mark in text for mark in ('"random_weights": true', '"random_init": true', "randomly initialised"))
    return out, random


def build_rows(items: list[tuple[str, str, str, str]], registry_files: list[str]) -> list[Row]:
    from srdit.sample import sampler_tag

    registry = load_registry(*registry_files)
    rows = []
    for name, step, metrics_path, grid in items:
        if name not in registry:
            raise ValueError(f"--item {name}: not an entry of the ablation registry")
        cfg = get_config(name, *registry_files)
        ours, random = read_metrics(Path(metrics_path))
        rows.append(Row(name=name, step=int(step), group=inherited_meta(name, registry, "group") or "other",
                        description=registry[name].get("description", ""), nfe=cfg.sample.num_steps,
                        tag=sampler_tag(cfg.sample),
                        run=inherited_meta(name, registry, "train_from") or name, ours=ours,
                        paper=registry[name].get("paper") or {}, grid=Path(grid) if grid else None,
                        random_weights=random, tokenizer=cfg.data.tokenizer))
    return rows


def stand_in_note(rows: list[Row], random_weights: bool) -> str | None:
    """What stood in for the paper's pretrained networks in these rows, or None (none did)."""
    if not (random_weights or any(r.random_weights for r in rows)):
        return None
    pixel = any(r.tokenizer == "pixel" for r in rows)
    learned = any(r.tokenizer != "pixel" for r in rows)
    random = (["the tokenizer (its latents and decoded images are noise)"] if learned else []) + [
        "the DINOv2 teacher (the REG class token and REPA targets carry no meaning)"]
    note = ("**Stand-ins, not pretrained weights**: " + " and ".join(random) +
            (" are" if learned else " is") + " randomly initialised.")
    if pixel:
        note += (" The pixel tokenizer (exact space-to-depth; nothing learned) replaces E2E-INVAE, so the "
                 "model learns pixels directly.")
    return note + (" These numbers show that the pipeline runs" + (" and learns" if pixel else "") +
                   "; they say nothing about SR-DiT and must not be compared with the paper.")


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def table_csv(rows: list[Row], random_weights: bool) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["group", "ablation", "step", "nfe", "weights", *METRICS,
                     *(f"paper_{m}" for m in METRICS), "paper_step", "paper_row", "sampler", "description"])
    for r in rows:
        weights = "random" if (random_weights or r.random_weights) else "pretrained"
        writer.writerow([r.group, r.name, r.step, r.nfe, weights,
                         *(_fmt(r.ours[m], 5) for m in METRICS),
                         *(_fmt(r.paper.get(m), 5) for m in METRICS),
                         r.paper.get("step", ""), r.paper.get("row", ""), r.tag, r.description])
    return buf.getvalue()


def table_markdown(rows: list[Row], title: str, random_weights: bool, training_grid: bool = False) -> str:
    lines = [f"# {title}", ""]
    note = stand_in_note(rows, random_weights)
    if note:
        lines += [note, ""]
    lines += ["Each cell is ours, with the paper's number (docs/recipe.md section 5) in parentheses where "
              "the paper reports this row at this step. Samplers are spelled out in `ablations.csv`.", ""]
    shown = [m for m in METRICS if m != "kdd_std"]
    for group in dict.fromkeys(r.group for r in rows):
        lines += [f"## {group}", "",
                  "| ablation | step | NFE | " + " | ".join(HEADERS[m] for m in shown) + " | description |",
                  "|---|---:|---:|" + "---:|" * len(shown) + "---|"]
        for r in (r for r in rows if r.group == group):
            same_step = r.paper.get("step") == r.step
            cells = []
            for m in shown:
                cell = _fmt(r.ours[m])
                if same_step and r.paper.get(m) is not None:
                    cell += f" ({_fmt(float(r.paper[m]))})"
                cells.append(cell)
            lines.append(f"| {r.name} | {r.step} | {r.nfe} | " + " | ".join(cells) + f" | {r.description} |")
        lines.append("")
    grids = [r for r in rows if r.grid is not None]
    if grids:
        lines += ["## Sample grids", ""]
        if training_grid:
            lines += [f"- the training images, in the sample grids' layout (what each class looks like): "
                      f"![training images](grids/{TRAINING_GRID})"]
        lines += [f"- {r.name}, step {r.step}: ![{r.name} step {r.step}](grids/{r.name}_step{r.step:07d}.png)"
                  for r in grids]
        lines.append("")
    return "\n".join(lines)


def training_images_grid(images_h5: str | Path, count: int = 64):
    """A grid of real training images in the layout of the sample grids: position i shows class
    i mod K (K classes in the cache), as the balanced sampler labels sample i, so each sample grid
    can be set beside it. Each class shows its images in cache order."""
    import h5py
    import numpy as np

    from srdit.generate_merge import sample_grid

    with h5py.File(images_h5, "r") as f:
        if "images" not in f or "labels" not in f:
            raise ValueError(f"{images_h5}: expected an image cache from `srdit prepare` (datasets images, labels)")
        labels = f["labels"][:]
        classes = np.unique(labels)
        if not len(classes):
            raise ValueError(f"{images_h5}: the image cache is empty")
        wanted = classes[np.arange(count) % len(classes)]
        # position i shows its class's (i // K)-th image, cycling when the class has fewer
        picks = []
        for i, c in enumerate(wanted):
            rows = np.flatnonzero(labels == c)
            picks.append(rows[(i // len(classes)) % len(rows)])
        unique, inverse = np.unique(picks, return_inverse=True)    # h5py reads need increasing indices
        images = f["images"][unique][inverse]
    return sample_grid(images, wanted)


def plot_fid_vs_step(rows: list[Row], path: Path, title: str, random_weights: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        curves.setdefault((r.run, r.tag), []).append(r)
    fig, ax = plt.subplots(figsize=(8, 5))
    for (run, _tag), points in curves.items():
        points.sort(key=lambda r: r.step)
        label = points[-1].name
        line, = ax.plot([p.step for p in points], [p.ours["fid"] for p in points], "o-", label=label)
        paper = sorted((p.paper["step"], float(p.paper["fid"])) for p in points
                       if p.paper.get("fid") is not None and p.paper.get("step") is not None)
        if paper:
            ax.plot(*zip(*paper), "s--", mfc="none", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("training step")
    ax.set_ylabel("FID (lower is better)")
    random = random_weights or any(r.random_weights for r in rows)
    suffix = " [random-weight stand-ins]" if random and "random" not in title.lower() else ""
    ax.set_title(f"{title}{suffix}\nsolid: ours; hollow squares: the paper", fontsize=9)
    if len(curves) <= 20:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="report folder (results/report)")
    parser.add_argument("--item", nargs=4, action="append", required=True,
                        metavar=("NAME", "STEP", "METRICS_JSON", "GRID_PNG"),
                        help="one evaluated checkpoint: ablation name, step, its metrics JSON and sample "
                             "grid ('' for none); repeat for every row")
    parser.add_argument("--registry", action="append", default=[], help="extra ablation registry YAML")
    parser.add_argument("--title", default="SR-DiT ablations", help="title of the tables and the plot")
    parser.add_argument("--random-weights", action="store_true",
                        help="the run used randomly initialised stand-ins for the pretrained networks "
                             "(teacher, tokenizer unless pixel): say so everywhere")
    parser.add_argument("--training-images", default=None, metavar="IMAGES_H5",
                        help="an image cache of `srdit prepare`: add grids/training_images.png, real images "
                             "in the sample grids' layout, to set the samples beside")
    parser.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    rows = build_rows([tuple(i) for i in args.item], args.registry)
    write_atomic(out / "ablations.csv", table_csv(rows, args.random_weights))
    if args.training_images:
        buf = io.BytesIO()
        training_images_grid(args.training_images).save(buf, format="PNG")
        write_atomic(out / "grids" / TRAINING_GRID, buf.getvalue())
    write_atomic(out / "ablations.md", table_markdown(rows, args.title, args.random_weights,
                                                      training_grid=bool(args.training_images)))
    plot_fid_vs_step(rows, out / "fid_vs_step.png", args.title, args.random_weights)
    for r in rows:
        if r.grid is not None:
            dest = out / "grids" / f"{r.name}_step{r.step:07d}.png"
            shutil.copyfile(r.grid, dest.with_name(dest.name + ".tmp"))
            os.replace(dest.with_name(dest.name + ".tmp"), dest)
    print(f"report: {len(rows)} rows -> {out}/ablations.csv, ablations.md, fid_vs_step.png, grids/")
    return 0
