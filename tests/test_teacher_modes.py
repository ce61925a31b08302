"""The two teacher modes (config data.cache_teacher): DINOv2 features cached in the latent cache
by `srdit encode`, or the teacher run online by the trainer on the image cache (bf16 autocast on
a GPU, as the original does). On the same images and the same batch they give the same targets
(up to the cache's float16 storage) and the same loss. Both modes also train end to end in
tests/test_train.py (the online one through the CLI)."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from srdit.cli import main as cli_main
from srdit.config import get_config
from srdit.data.dataset import TrainDataset
from srdit.models import build_model
from srdit.train import _Trainer
from srdit.transport import training_losses

ENTRY = "demo_srdit"           # 64 px, 32 x 4 x 4 latents, DINOv2-S/14 teacher (384 wide, 16 tokens)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """One image cache and two latent caches encoded from it: with and without teacher features."""
    root = tmp_path_factory.mktemp("modes")
    assert cli_main(["demo-data", "--out", str(root / "src"), "--per-class", "4"]) == 0
    img = root / "images64"
    assert cli_main(["prepare", "--src", str(root / "src"), "--out", str(img / "shard00000.h5"), "--resolution",
                     "64", "--shard", "0", "--num-shards", "1", "--workers", "1"]) == 0
    assert cli_main(["prepare", "--join", "--out", str(img / "images.h5")]) == 0
    out = {}
    for mode, flags in (("cached", ["--teacher", "dinov2_vits14"]), ("online", ["--no-teacher"])):
        lat = root / f"latents-{mode}"
        assert cli_main(["encode", "--images", str(img / "images.h5"), "--out", str(lat / "shard00000.h5"),
                         "--tokenizer", "e2e-invae", *flags, "--random-weights", "--tokenizer-set", "ch=32",
                         "--shard", "0", "--num-shards", "1", "--device", "cpu"]) == 0
        assert cli_main(["encode", "--join", "--out", str(lat / "cache.h5")]) == 0
        out[mode] = TrainDataset(lat / "cache.h5")
    return out


def trainer_features(cfg, batch):
    """The trainer's own teacher path (srdit.train._Trainer._teacher_features) on a batch."""
    fake = types.SimpleNamespace(cfg=cfg, teacher=None, device=torch.device("cpu"), resources=None,
                                 random_teacher=True)
    return _Trainer._teacher_features(fake, batch)


def test_online_and_cached_teacher_give_the_same_loss(caches):
    cfg = get_config(ENTRY)
    cached, online = caches["cached"], caches["online"]
    assert cached.has_teacher and not online.has_teacher
    rows = np.arange(8)
    b_cached, b_online = cached[rows], online[rows]
    assert torch.equal(b_cached["latent"], b_online["latent"]) and torch.equal(b_cached["label"], b_online["label"])
    assert "image" in b_online and "teacher_cls" not in b_online

    cls_c, tok_c = trainer_features(cfg, b_cached)            # read from the cache (float16 there)
    cls_o, tok_o = trainer_features(cfg, b_online)            # DINOv2 run on the images now
    assert tok_o.shape == tok_c.shape == (8, 16, 384) and cls_o.shape == cls_c.shape == (8, 384)
    assert torch.allclose(tok_o, tok_c, atol=2e-2, rtol=2e-3) and torch.allclose(cls_o, cls_c, atol=2e-2, rtol=2e-3)

    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    x0 = b_cached["latent"].float()

    def loss(cls, tokens):
        torch.manual_seed(1)                               # SPRINT's kept tokens and label dropout
        gen = torch.Generator().manual_seed(2)             # t and the noise
        return training_losses(model, x0, b_cached["label"].long(), cls, tokens, cfg.objective,
                               generator=gen, path_drop=False)

    with torch.no_grad():
        lc, lo = loss(cls_c, tok_c), loss(cls_o, tok_o)
        other = loss(cls_c.roll(1, 0), tok_c.roll(1, 0))   # another batch's targets: a clearly other loss
    for name in ("total", "v", "cls", "proj"):
        assert getattr(lo, name).item() == pytest.approx(getattr(lc, name).item(), rel=1e-3, abs=1e-5), name
    assert abs(other.proj.item() - lc.proj.item()) > 100 * abs(lo.proj.item() - lc.proj.item())
