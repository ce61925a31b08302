"""`srdit verify-release`: download, convert, sample and evaluate the released SR-DiT-B/1 (256 px).

    srdit verify-release [--out results/verify_release] [--resources resources] [--shard I --num-shards S]

1. Makes sure every file is there: the checkpoint (HF `SwayStar123/SpeedrunDiT`, `256/0400000.pt`),
   the E2E-INVAE tokenizer, ADM's `VIRTUAL_imagenet256_labeled.npz`, the FID Inception and DINOv2-L.
   Missing files are downloaded into `--resources`; every host is probed first (a few seconds),
   so without network the command stops at once, naming each file and the command that fetches it.
2. Converts the checkpoint safely (`srdit.convert`, no arbitrary unpickling) into an srdit
   snapshot (EMA weights) whose config is the preset `b1_srdit`.
3. Samples with the paper's headline settings (preset `b1_srdit`: Euler-Maruyama SDE, NFE 250, no
   guidance, time shift, balanced labels, 50,000 samples) through `srdit sample`'s shards: all
   shards in this process, or only `--shard I` of `--num-shards S` (a Slurm array), rerunnable.
4. When every shard exists: merges, evaluates and prints our numbers next to the paper's
   (FID 3.49, docs/recipe.md 5.1 row 9), and writes OUT/verify.json.
"""
from __future__ import annotations

import argparse
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

from srdit.resources import DEFAULT_ROOT, RESOURCES, MissingResourceError, fetch, fetch_command, resource_path

PRESET = "b1_srdit"
CHECKPOINT = "srdit-b1-256"
NEEDED = [CHECKPOINT, "e2e-invae", "adm-ref-256", "inception-fid"]
KDD_RESOURCE = "dinov2_vitl14"
METRICS = [("fid", "FID"), ("sfid", "sFID"), ("is", "IS"), ("prec", "Precision"), ("rec", "Recall"), ("kdd", "KDD")]
OUR_KEYS = {"fid": "fid", "sfid": "sfid", "is": "inception_score", "prec": "precision", "rec": "recall", "kdd": "kdd"}


class VerifyError(RuntimeError):
    """A step of the verification cannot run; the message says which file or step and what to do."""


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="results/verify_release", help="work folder (snapshot, samples, metrics)")
    parser.add_argument("--resources", default=str(DEFAULT_ROOT), help="resources folder (downloads go here)")
    parser.add_argument("--no-download", action="store_true", help="never download: fail if a file is missing")
    parser.add_argument("--probe-timeout", type=float, default=5.0, help="seconds to wait for each download host")
    parser.add_argument("--num-samples", type=int, default=None, help="samples (default: the preset's 50,000)")
    parser.add_argument("--shard", type=int, default=None, help="make only this shard (with --num-shards)")
    parser.add_argument("--num-shards", type=int, default=1, help="shards the samples are split into")
    parser.add_argument("--set", action="append", default=[], metavar="sample.KEY=VALUE",
                        help="sampler override (e.g. sample.batch_size=128); the headline settings are the preset's")
    parser.add_argument("--no-kdd", action="store_true", help="skip KDD (no DINOv2-L download)")
    parser.add_argument("--device", default=None)
    parser.set_defaults(func=run)


# --------------------------------------------------------------------------------------------
# 1. Files
# --------------------------------------------------------------------------------------------

def host_reachable(url: str, timeout: float) -> str | None:
    """None when a TCP connection to the URL's host opens within `timeout`, else the reason."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{parsed.hostname}:{port} unreachable ({e.__class__.__name__}: {e})"


def ensure_resources(names: list[str], root: str | Path, download: bool = True, timeout: float = 5.0) -> dict:
    """{name: path} for every resource, downloading missing ones; VerifyError lists every failure."""
    root = Path(root)
    paths, missing = {}, []
    for name in names:
        try:
            paths[name] = resource_path(name, root)
        except MissingResourceError:
            missing.append(name)
    problems = []
    for name in missing:                     # probe every host before downloading anything
        res = RESOURCES[name]
        how = f"fetch it with: {fetch_command(name, root)}"
        if not download:
            problems.append(f"{res.filename} ({res.description}) is missing from {root.resolve()}; {how}")
            continue
        reason = host_reachable(res.url, timeout)
        if reason:
            problems.append(f"{res.filename} ({res.description}) is missing and cannot be downloaded from {res.url}: "
                            f"{reason}. No network here? On a machine with internet access, {how}, then copy it "
                            f"to {(root / res.filename).resolve()}")
    if problems:
        raise VerifyError("verify-release needs files that are not here:\n  - " + "\n  - ".join(problems))
    for name in missing:
        try:
            paths[name] = fetch(name, root)
        except MissingResourceError as e:
            raise VerifyError(f"{RESOURCES[name].filename}: {e}\n  Or fetch it with: "
                              f"{fetch_command(name, root)}") from None
    return paths


# --------------------------------------------------------------------------------------------
# 2. Conversion
# --------------------------------------------------------------------------------------------

def convert_release(checkpoint: Path, snapshot: Path) -> Path:
    """The released checkpoint as an srdit snapshot (config = preset b1_srdit with the checkpoint's sizes)."""
    from srdit.checkpoint import save_snapshot
    from srdit.config import get_config
    from srdit.convert import (convert_state_dict, load_original_checkpoint, model_config_from_args,
                               original_state_dict)

    if snapshot.exists():
        return snapshot
    print(f"converting {checkpoint} ...")
    original = load_original_checkpoint(checkpoint)
    if "args" not in original:
        raise VerifyError(f"{checkpoint}: no `args` entry; expected the released training checkpoint 256/0400000.pt")
    model_cfg = model_config_from_args(original["args"])
    preset = get_config(PRESET)
    differences = [k for k, v in asdict(model_cfg).items() if asdict(preset.model).get(k) != v]
    if differences:
        print(f"note: the checkpoint's model differs from preset {PRESET} in {differences}; using the checkpoint's")
    cfg = get_config(PRESET, overrides={"model": asdict(model_cfg)})
    ema = convert_state_dict(original_state_dict(original, use_ema=True), model_cfg)
    raw = convert_state_dict(original_state_dict(original, use_ema=False), model_cfg) if "model" in original else ema
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    save_snapshot(snapshot, raw, ema, cfg.to_json(), int(original.get("steps", 400_000)))
    return snapshot


# --------------------------------------------------------------------------------------------
# 3-4. Sampling, evaluation, comparison
# --------------------------------------------------------------------------------------------

def comparison_table(metrics: dict, paper: dict) -> str:
    lines = [f"{'metric':<10} {'ours':>10} {'paper':>10}"]
    for key, label in METRICS:
        ours = metrics.get(OUR_KEYS[key])
        ours_text = "n/a" if ours is None else f"{ours:.4f}"
        lines.append(f"{label:<10} {ours_text:>10} {paper.get(key, float('nan')):>10.4f}")
    return "\n".join(lines)


def verify(args) -> int:
    from srdit.config import entry_meta, get_config
    from srdit.generate import apply_sample_overrides, sample_shard, shard_paths
    from srdit.generate_merge import merge
    from srdit.metrics.evaluate import evaluate, write_json
    from srdit.sample import sampler_tag

    out = Path(args.out)
    needed = NEEDED + ([] if args.no_kdd else [KDD_RESOURCE])
    paths = ensure_resources(needed, args.resources, download=not args.no_download, timeout=args.probe_timeout)
    snapshot = convert_release(paths[CHECKPOINT], out / "snapshot" / "srdit-b1-256-0400000.safetensors")

    overrides = list(args.set) + ([f"sample.num_samples={args.num_samples}"] if args.num_samples else [])
    cfg = apply_sample_overrides(get_config(PRESET), overrides)
    sample_dir = out / "samples" / sampler_tag(cfg.sample)
    shards = range(args.num_shards) if args.shard is None else [args.shard]
    for shard in shards:
        sample_shard(snapshot, sample_dir, shard, args.num_shards, overrides=overrides, resources=args.resources,
                     device=args.device)
    pending = [i for i in range(args.num_shards) if not shard_paths(sample_dir, i)[1].exists()]
    if pending:
        print(f"{len(pending)} shard(s) still to make ({pending[:10]}...); rerun for them, then once more without "
              f"--shard to merge and evaluate")
        return 0

    merge(sample_dir)
    started = time.time()
    metrics = evaluate(sample_dir / "samples.npz", paths["adm-ref-256"], resources=args.resources,
                       kdd=not args.no_kdd, device=args.device)
    write_json(out / "metrics.json", metrics)
    paper = entry_meta(PRESET).get("paper", {})
    table = comparison_table(metrics, paper)
    print(f"\nSR-DiT-B/1 256 px, released checkpoint, {cfg.sample.num_samples} samples, {sampler_tag(cfg.sample)}")
    print(table)
    ours = {k: metrics.get(v) for k, v in OUR_KEYS.items()}
    write_json(out / "verify.json", {"preset": PRESET, "paper": paper, "ours": ours,
                                     "sampler_tag": sampler_tag(cfg.sample), "metrics": str(out / "metrics.json"),
                                     "evaluate_seconds": round(time.time() - started, 1)})
    return 0


def run(args) -> int:
    try:
        return verify(args)
    except VerifyError as e:
        print(f"srdit verify-release: {e}", file=sys.stderr)
        return 1
