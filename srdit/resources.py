"""Pretrained files the pipeline needs, where they live, and how to fetch them.

Compute nodes never download: the workflow's `weights` rules run `srdit fetch` once on the login
node, into `resources/`. Everything that loads a pretrained file asks `resource_path`, which
raises `MissingResourceError` naming the file, where it was expected and the command that
fetches it. A fetched file is written under a temporary name and renamed into place, and its
SHA-256 is recorded in `resources/CHECKSUMS.json`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path(os.environ.get("SRDIT_RESOURCES", "resources"))


@dataclass(frozen=True)
class Resource:
    name: str
    filename: str
    url: str
    description: str
    sha256: str | None = None   # known upstream checksum, when published


HF = "https://huggingface.co"
DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"
RESOURCES: dict[str, Resource] = {r.name: r for r in [
    Resource("e2e-invae", "e2e-invae-400k.pt", f"{HF}/REPA-E/e2e-invae/resolve/main/e2e-invae-400k.pt",
             "E2E-INVAE tokenizer (f16, 32 channels), a flat state_dict"),
    Resource("sd-vae", "sd-vae-ft-ema", f"{HF}/stabilityai/sd-vae-ft-ema",
             "SD-VAE ft-EMA (diffusers folder: config.json + diffusion_pytorch_model.safetensors)"),
    Resource("dinov2_vits14", "dinov2_vits14_pretrain.pth", f"{DINOV2}/dinov2_vits14/dinov2_vits14_pretrain.pth",
             "DINOv2 ViT-S/14 (teacher option)"),
    Resource("dinov2_vitb14", "dinov2_vitb14_pretrain.pth", f"{DINOV2}/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
             "DINOv2 ViT-B/14: the REPA/REG teacher"),
    Resource("dinov2_vitl14", "dinov2_vitl14_pretrain.pth", f"{DINOV2}/dinov2_vitl14/dinov2_vitl14_pretrain.pth",
             "DINOv2 ViT-L/14: the KDD feature extractor"),
    Resource("inception-fid", "inception-2015-12-05.pt",
             "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
             "FID Inception-v3: NVIDIA's TorchScript port of the TF graph ADM uses (pool_3, mixed_6/conv, logits; "
             "the file clean-fid loads)"),
    Resource("adm-ref-256", "VIRTUAL_imagenet256_labeled.npz",
             "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz",
             "ADM reference batch, ImageNet 256 (10K images + train-set statistics)"),
    Resource("adm-ref-512", "VIRTUAL_imagenet512.npz",
             "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/512/VIRTUAL_imagenet512.npz",
             "ADM reference batch, ImageNet 512"),
    Resource("srdit-b1-256", "srdit-b1-256-0400000.pt",
             f"{HF}/SwayStar123/SpeedrunDiT/resolve/main/256/0400000.pt",
             "the released SR-DiT-B/1 256 px checkpoint (400K steps)"),
]}


class MissingResourceError(FileNotFoundError):
    """A pretrained file is not where it should be; the message says how to fetch it."""


def fetch_command(name: str, root: Path) -> str:
    return f"python -m srdit fetch {name} --root {root}   (or: snakemake --profile profiles/slurm weights)"


def resource_path(name: str, root: str | Path | None = None) -> Path:
    """Path of resource `name` under `root`; raises MissingResourceError if it is not there."""
    if name not in RESOURCES:
        raise KeyError(f"unknown resource {name!r}; known: {', '.join(RESOURCES)}")
    root = Path(root) if root is not None else DEFAULT_ROOT
    path = root / RESOURCES[name].filename
    if not path.exists():
        raise MissingResourceError(
            f"{RESOURCES[name].description}: file {RESOURCES[name].filename} is missing; expected at "
            f"{path.resolve()}. Fetch it on a machine with internet access with:\n  {fetch_command(name, root)}")
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _download(url: str, dest: Path) -> None:
    from tqdm import tqdm

    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
            while block := response.read(1 << 20):
                out.write(block)
                bar.update(len(block))
    os.replace(tmp, dest)   # only a complete download gets the real name


def _download_hf_folder(repo_url: str, dest: Path) -> None:
    """A diffusers model folder: config.json + diffusion_pytorch_model.safetensors."""
    tmp = dest.with_name(dest.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "diffusion_pytorch_model.safetensors"):
        _download(f"{repo_url}/resolve/main/{f}", tmp / f)
    os.replace(tmp, dest)


def record_checksum(root: Path, name: str, path: Path) -> str:
    digest = sha256_file(path) if path.is_file() else "folder"
    book = root / "CHECKSUMS.json"
    data = json.loads(book.read_text()) if book.exists() else {}
    data[name] = {"file": path.name, "sha256": digest}
    tmp = book.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, book)
    return digest


def fetch(name: str, root: str | Path | None = None, force: bool = False) -> Path:
    """Download resource `name` into `root` (no-op when present), verify and record its checksum."""
    res = RESOURCES[name]
    root = Path(root) if root is not None else DEFAULT_ROOT
    root.mkdir(parents=True, exist_ok=True)
    dest = root / res.filename
    if dest.exists() and not force:
        return dest
    try:
        if res.name == "sd-vae":
            _download_hf_folder(res.url, dest)
        else:
            _download(res.url, dest)
    except OSError as e:
        raise MissingResourceError(
            f"could not download {res.filename} from {res.url} ({e}). This machine may have no internet "
            f"access: fetch it elsewhere and copy it to {dest.resolve()}") from e
    digest = record_checksum(root, name, dest)
    if res.sha256 and digest != res.sha256:
        dest.unlink()
        raise MissingResourceError(f"{res.filename}: checksum {digest} does not match the published {res.sha256}")
    return dest


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help=f"resources to fetch (default: all); known: {', '.join(RESOURCES)}")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="resources folder (default: resources/)")
    parser.add_argument("--force", action="store_true", help="download again even if present")
    parser.set_defaults(func=run)


def run(args) -> int:
    names = args.names or list(RESOURCES)
    failed = []
    for name in names:
        if name not in RESOURCES:
            print(f"unknown resource {name!r}; known: {', '.join(RESOURCES)}", file=sys.stderr)
            return 2
        try:
            path = fetch(name, args.root, force=args.force)
            print(f"{name}: {path}")
        except MissingResourceError as e:
            print(f"{name}: {e}", file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0
