"""Data pipeline: demo tree -> prepare (crop, report, shards, join) -> encode (seeded latents,
teacher features, kill + rerun, sharding) -> cache validation -> training loader (resume,
distributed sharding). Tiny random tokenizer (E2E-INVAE at width 32) and teacher (one block)
at 32 px keep it fast.
"""
from __future__ import annotations

import itertools
import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from srdit.cli import main as cli_main
from srdit.data.cache import (FORMAT_VERSION, LATENTS, CacheError, CacheMismatchError, ShardedArrays, ShardWriter,
                              open_cache, shard_path, split_range)
from srdit.data.crop import adm_center_crop
from srdit.data.dataset import EpochBatchSampler, TrainDataset, make_train_loader
from srdit.data.demo import CLASSES, CORRUPT_FILE, NON_IMAGE_FILE, write_demo_tree
from srdit.data.encode import encode_shard, join_latents, noise_for
from srdit.data.prepare import join_images, prepare_shard, read_report, report_path
from srdit.teachers import load_teacher
from srdit.tokenizers import load_tokenizer

RES = 32
PER_CLASS = 5
BATCH = 4


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_demo_tree(tmp_path_factory.mktemp("src") / "tree", per_class=PER_CLASS)


@pytest.fixture(scope="module")
def images(source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    shards = [prepare_shard(source, shard_path(folder, 0), RES, 0, 2, workers=2),
              prepare_shard(source, shard_path(folder, 1), RES, 1, 2, workers=0)]
    return join_images(shards, folder / "images.h5")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("e2e-invae", random_init=True, ch=32)


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("dinov2_vits14", RES, random_init=True, depth=1)


def encode_all(images, folder, tokenizer, teacher, num_shards, **kwargs):
    paths = [encode_shard(images, shard_path(folder, i), tokenizer, teacher, i, num_shards, batch_size=BATCH, **kwargs)
             for i in range(num_shards)]
    return join_latents(paths, folder / "cache.h5")


def read_all(cache) -> dict[str, np.ndarray]:
    index = open_cache(cache, "latents")
    arrays = ShardedArrays(index)
    rows = np.arange(index.rows)
    return {name: arrays.read(name, rows) for name in index.arrays}


@pytest.fixture(scope="module")
def cache(images, tokenizer, teacher, tmp_path_factory):
    return encode_all(images, tmp_path_factory.mktemp("latents"), tokenizer, teacher, num_shards=1, moments=True)


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------

def test_adm_center_crop():
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (128, 192, 3), dtype=np.uint8))
    # short side exactly 2x: one BOX halving, the bicubic step is then the identity
    expected = np.asarray(wide.resize((96, 64), Image.BOX))[:, 16:80]
    assert np.array_equal(adm_center_crop(wide, 64), expected)
    tall = Image.fromarray(rng.integers(0, 256, (90, 50), dtype=np.uint8))      # grayscale, upscaled
    out = adm_center_crop(tall, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_prepare_lists_skipped_files_with_reasons(source, images):
    skipped = dict(read_report(images.with_suffix(".skipped.tsv")))
    assert set(skipped) == {CORRUPT_FILE, NON_IMAGE_FILE}
    assert "truncated" in skipped[CORRUPT_FILE]
    assert "cannot identify image" in skipped[NON_IMAGE_FILE]
    index = open_cache(images, "images")
    assert index.rows == PER_CLASS * len(CLASSES) and index.attrs["skipped"] == 2
    shard_skips = [int(h5py.File(p, "r").attrs["skipped"]) for p in index.shard_files]
    shard_reports = [len(read_report(report_path(p))) for p in index.shard_files]
    assert sum(shard_skips) == 2 and shard_skips == shard_reports
    with h5py.File(images, "r") as f:
        assert json.loads(f.attrs["class_names"]) == sorted(CLASSES)
        labels, paths = f["labels"][:], [p.decode() for p in f["paths"][:]]
        assert f["images"].shape == (index.rows, RES, RES, 3) and f["images"].dtype == np.uint8
        first = f["images"][7]
    assert paths == sorted(paths) and NON_IMAGE_FILE not in paths
    assert labels.tolist() == [sorted(CLASSES).index(p.split("/")[0]) for p in paths]
    assert np.array_equal(first, adm_center_crop(Image.open(source / paths[7]), RES))


def test_prepare_rerun_skips_finished_shard_and_join_needs_all(source, images, tmp_path):
    done = shard_path(images.parent, 0)
    stamp = done.stat().st_mtime_ns
    prepare_shard(source, done, RES, 0, 2)
    assert done.stat().st_mtime_ns == stamp
    with pytest.raises(CacheMismatchError, match="other settings"):
        prepare_shard(source, done, 64, 0, 2)          # a finished shard built differently is never reused
    with pytest.raises(CacheError, match="in no shard"):
        join_images([shard_path(images.parent, 1)], tmp_path / "images.h5")


def test_prepare_and_encode_cli(source, tmp_path):
    """The command lines the workflow runs: one shard per call, then --join."""
    img = tmp_path / "images32"
    for i in range(2):
        assert cli_main(["prepare", "--src", str(source), "--out", str(img / f"shard{i:05d}.h5"), "--resolution",
                         str(RES), "--shard", str(i), "--num-shards", "2", "--workers", "1"]) == 0
    assert cli_main(["prepare", "--join", str(img / "shard00000.h5"), str(img / "shard00001.h5"),
                     "--out", str(img / "images.h5")]) == 0
    lat = tmp_path / "latents"
    assert cli_main(["encode", "--images", str(img / "images.h5"), "--out", str(lat / "shard00000.h5"),
                     "--tokenizer", "e2e-invae", "--no-teacher", "--random-weights", "--tokenizer-set", "ch=32",
                     "--shard", "0", "--num-shards", "1", "--device", "cpu"]) == 0
    assert cli_main(["encode", "--join", "--out", str(lat / "cache.h5")]) == 0
    assert open_cache(lat, "latents", expect={"tokenizer": "e2e-invae", "teacher": "none"}).rows == 20
    # a missing source folder is a clear error, not a traceback
    assert cli_main(["prepare", "--src", str(tmp_path / "nope"), "--out", str(img), "--resolution", "32"]) == 1


# --------------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------------

def test_encode_stores_seeded_posterior_samples_and_teacher_features(images, cache, tokenizer, teacher):
    data = read_all(cache)
    with h5py.File(images, "r") as f:
        pixels, labels = torch.from_numpy(f["images"][:]), f["labels"][:]
    rows = np.arange(len(labels))
    assert data["latents"].shape == (20, 32, 2, 2) and data["latents"].dtype == np.float32
    assert np.array_equal(data["labels"], labels)
    noise = noise_for(rows, (32, 2, 2), seed=0).numpy()
    assert np.array_equal(data["latents"], data["latent_mean"] + data["latent_std"] * noise)
    with torch.no_grad():
        mean, std = tokenizer.posterior(pixels[:BATCH])
        cls, tokens = teacher.features(pixels[:BATCH])
    assert np.allclose(data["latent_mean"][:BATCH], mean.numpy(), atol=1e-5)
    assert data["teacher_cls"].dtype == np.float16 and data["teacher_tokens"].shape == (20, 4, 384)
    assert np.allclose(data["teacher_tokens"][:BATCH], tokens.half().numpy(), atol=2e-3)
    assert np.allclose(data["teacher_cls"][:BATCH], cls.half().numpy(), atol=2e-3)
    # the draw depends on the image index and the seed, nothing else
    assert not np.array_equal(noise_for(rows, (4,), 0), noise_for(rows, (4,), 1))
    assert np.array_equal(noise_for(rows[5:9], (4,), 0), noise_for(rows, (4,), 0)[5:9])


def test_sharded_encode_equals_unsharded(images, cache, tokenizer, teacher, tmp_path):
    # 20 rows = 5 batches of 4 over 6 shards: batch-aligned ranges, one shard empty
    ranges = [split_range(20, i, 6, block=BATCH) for i in range(6)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 20 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(start % BATCH == 0 for start, _ in ranges) and any(start == stop for start, stop in ranges)
    sharded = encode_all(images, tmp_path, tokenizer, teacher, num_shards=6, moments=True)
    one, six = read_all(cache), read_all(sharded)
    assert one.keys() == six.keys()
    for name in one:
        assert np.array_equal(one[name], six[name]), name
    assert len(open_cache(sharded, "latents").shard_files) == 6


def test_overlapped_encode_equals_serial(images, cache, tokenizer, teacher, tmp_path):
    """Reader and writer threads change when things happen, not what is written: same bits."""
    serial = encode_all(images, tmp_path, tokenizer, teacher, num_shards=1, moments=True, overlap=False)
    with h5py.File(cache, "r") as a, h5py.File(serial, "r") as b:   # `cache` was encoded overlapped
        assert a.attrs["checksum"] == b.attrs["checksum"]
    overlapped, plain = read_all(cache), read_all(serial)
    assert overlapped.keys() == plain.keys()
    for name in plain:
        assert np.array_equal(overlapped[name], plain[name]), name
    # the writer thread hands on what it raises (here: a killed job), serial or overlapped alike
    for overlap in (True, False):
        rows = []

        def kill(written):
            rows.append(written)
            raise Killed

        with pytest.raises(Killed):
            encode_shard(images, tmp_path / f"killed{overlap}.h5", tokenizer, teacher, batch_size=BATCH,
                         after_batch=kill, overlap=overlap)
        assert rows == [BATCH] and not (tmp_path / f"killed{overlap}.h5").exists()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_tokenizer_runs_in_float32_and_teacher_under_bf16_autocast(images, tokenizer, teacher, device, tmp_path):
    """The reference encodes latents in float32 and computes teacher features under bf16
    autocast. Forward hooks on the real (random, tiny) networks record what their first layers
    see. On the CPU the teacher's autocast is switched on as on a GPU (`teacher_autocast=True`),
    and the whole encode runs inside a caller's bf16 autocast, which must not reach the tokenizer."""
    seen = {"tokenizer": [], "teacher": []}

    def record(part):
        def hook(module, inputs, output):
            seen[part].append((torch.is_autocast_enabled(output.device.type), output.dtype))
        return hook

    first = lambda net: next(m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    handles = [first(tokenizer).register_forward_hook(record("tokenizer")),
               first(teacher).register_forward_hook(record("teacher"))]
    outer = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cpu")
    try:
        with outer:
            out = encode_shard(images, tmp_path / "shard.h5", tokenizer, teacher, batch_size=BATCH, device=device,
                               moments=True, teacher_autocast=True if device == "cpu" else None)
    finally:
        for h in handles:
            h.remove()
        tokenizer.to("cpu"), teacher.to("cpu")
    assert seen["tokenizer"] and set(seen["tokenizer"]) == {(False, torch.float32)}
    assert seen["teacher"] and set(seen["teacher"]) == {(True, torch.bfloat16)}
    with h5py.File(out, "r") as f:
        assert f.attrs["precision"] == "fp32+teacher-bf16"
    if device == "cpu":                  # float32 latents: the moments match a plain float32 forward pass
        with h5py.File(images, "r") as f, torch.no_grad():
            mean, std = tokenizer.posterior(torch.from_numpy(f["images"][:BATCH]))
        with h5py.File(out, "r") as f:
            assert np.array_equal(f["latent_mean"][:BATCH], mean.numpy())
            assert np.array_equal(f["latent_std"][:BATCH], std.numpy())


def test_reads_without_memory_map_match(cache):
    index = open_cache(cache, "latents")
    mapped, plain = ShardedArrays(index), ShardedArrays(index)
    plain._mapped = lambda shard, name: None        # force the h5py path
    rows = np.array([0, 3, 4, 11, 19])
    for name in index.arrays:
        assert np.array_equal(mapped.read(name, rows), plain.read(name, rows)), name
    with pytest.raises(ValueError, match="sorted"):
        mapped.read("latents", np.array([3, 1]))
    with pytest.raises(IndexError):
        mapped.read("latents", np.array([20]))


class Killed(Exception):
    pass


def test_killed_encode_reruns_to_the_same_cache(images, tokenizer, teacher, tmp_path):
    clean = encode_all(images, tmp_path / "clean", tokenizer, teacher, num_shards=2)
    folder = tmp_path / "killed"
    first = encode_shard(images, shard_path(folder, 0), tokenizer, teacher, 0, 2, batch_size=BATCH)

    def kill(rows):
        raise Killed(f"simulated kill after {rows} rows")

    second = shard_path(folder, 1)
    with pytest.raises(Killed):
        encode_shard(images, second, tokenizer, teacher, 1, 2, batch_size=BATCH, after_batch=kill)
    assert not second.exists() and second.with_name(second.name + ".tmp").exists()   # nothing looks complete
    with pytest.raises(CacheError, match="in no shard"):
        join_latents([first], folder / "cache.h5")
    stamp = first.stat().st_mtime_ns
    rerun = [encode_shard(images, shard_path(folder, i), tokenizer, teacher, i, 2, batch_size=BATCH) for i in range(2)]
    assert first.stat().st_mtime_ns == stamp                         # the finished shard was not redone
    assert not second.with_name(second.name + ".tmp").exists()
    resumed = join_latents(rerun, folder / "cache.h5")
    with h5py.File(clean, "r") as a, h5py.File(resumed, "r") as b:
        assert a.attrs["checksum"] == b.attrs["checksum"]
    expected, got = read_all(clean), read_all(resumed)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)


def test_cache_refuses_other_tokenizer_resolution_or_teacher(cache):
    TrainDataset(cache, expect=dict(tokenizer="e2e-invae", resolution=RES, teacher="dinov2_vits14"))
    with pytest.raises(CacheMismatchError, match=r"tokenizer='e2e-invae'.*tokenizer='sd-vae' is expected"):
        TrainDataset(cache, expect=dict(tokenizer="sd-vae"))
    with pytest.raises(CacheMismatchError, match="resolution"):
        TrainDataset(cache, expect=dict(tokenizer="e2e-invae", resolution=256))
    with pytest.raises(CacheMismatchError, match="dinov2_vitb14"):
        TrainDataset(cache, expect=dict(teacher="dinov2_vitb14"))


def test_encode_refuses_to_reuse_a_shard_built_differently(images, cache, tokenizer, teacher):
    with pytest.raises(CacheMismatchError, match="noise_seed"):
        encode_shard(images, shard_path(cache.parent, 0), tokenizer, teacher, 0, 1, batch_size=BATCH, seed=1,
                     moments=True)


def test_open_cache_detects_missing_rebuilt_or_corrupt_shards(images, tokenizer, tmp_path):
    cache = encode_all(images, tmp_path, tokenizer, None, num_shards=2)
    open_cache(cache, "latents", verify=True)
    shard = shard_path(tmp_path, 1)
    with h5py.File(shard, "r+") as f:                    # bytes changed behind the checksum's back
        f["latents"][0] = f["latents"][0] + 1
    open_cache(cache, "latents")                         # the cheap check cannot see it ...
    with pytest.raises(CacheError, match="corrupt"):
        open_cache(cache, "latents", verify=True)        # ... the deep one can
    encode_shard(images, tmp_path / "other.h5", tokenizer, None, 1, 2, batch_size=BATCH, seed=5)
    (tmp_path / "other.h5").replace(shard)               # a shard rebuilt after the join
    with pytest.raises(CacheError, match="rerun the --join"):
        open_cache(cache, "latents")
    shard.unlink()
    with pytest.raises(CacheError, match="missing"):
        open_cache(cache, "latents")


# --------------------------------------------------------------------------------------------
# training loader
# --------------------------------------------------------------------------------------------

def _take(loader, n):
    return [batch for batch in itertools.islice(loader, n)]


def test_loader_batches_and_exact_resume(cache):
    loader = make_train_loader(cache, micro_batch=3, seed=7, num_workers=2)
    assert loader.batches_per_epoch == 6
    first = _take(loader, 8)                        # crosses into the second epoch
    state = loader.state_dict()
    assert (state["position"], state["epoch"], state["batch_in_epoch"]) == (8, 1, 2)
    following = _take(loader, 5)
    batch = first[0]
    assert batch["latent"].shape == (3, 32, 2, 2) and batch["latent"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64
    assert batch["teacher_cls"].dtype == torch.float32 and batch["teacher_tokens"].shape == (3, 4, 384)

    resumed = make_train_loader(cache, micro_batch=3, seed=7, num_workers=0)
    resumed.load_state_dict(state)
    again = _take(resumed, 5)
    for a, b in zip(following, again):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # one epoch covers 18 distinct samples; the next epoch is a different order
    epoch0 = torch.cat([b["index"] for b in first[:6]])
    assert len(set(epoch0.tolist())) == 18
    assert not torch.equal(epoch0, torch.cat([b["index"] for b in first[6:8] + following[:4]]))
    data = read_all(cache)
    assert np.array_equal(batch["latent"].numpy(), data["latents"][batch["index"].numpy()])
    with pytest.raises(ValueError, match="seed"):
        make_train_loader(cache, micro_batch=3, seed=8, num_workers=0).load_state_dict(state)


def test_sampler_splits_each_global_batch_across_ranks():
    ranks = [EpochBatchSampler(20, micro_batch=3, rank=r, world_size=2, seed=1) for r in range(2)]
    assert ranks[0].batches_per_epoch == 3
    streams = [list(itertools.islice(iter(s), 6)) for s in ranks]
    for k in range(3):          # epoch 0: the global batch's slices, in the permutation's order (not sorted)
        a, b = streams[0][k], streams[1][k]
        assert np.array_equal(np.concatenate([a, b]), ranks[0].permutation(0)[k * 6:(k + 1) * 6])
    later = EpochBatchSampler(20, micro_batch=3, rank=1, world_size=2, seed=1, position=4)
    assert np.array_equal(next(iter(later)), streams[1][4])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatchSampler(5, micro_batch=3, rank=0, world_size=2, seed=0)


def test_loader_reads_images_when_no_teacher_features(images, tokenizer, tmp_path):
    cache = encode_all(images, tmp_path, tokenizer, None, num_shards=1)
    loader = make_train_loader(cache, micro_batch=4, num_workers=0, expect=dict(teacher="dinov2_vitb14"))
    batch = next(iter(loader))
    assert "teacher_cls" not in batch and batch["image"].shape == (4, 3, RES, RES)
    index = batch["index"].numpy()
    assert not np.array_equal(index, np.sort(index))       # handed over in the random order ...
    with h5py.File(images, "r") as f:
        expected = f["images"][:][index]                    # ... each image at its index's position
    assert torch.equal(batch["image"], torch.from_numpy(expected).permute(0, 3, 1, 2))


# --------------------------------------------------------------------------------------------
# CFM negatives: the micro-batch reaches the loss in random order
# --------------------------------------------------------------------------------------------

CLASSES_K, PER_K = 100, 20          # 2000 rows written in class order, as `prepare` writes ImageNet


def write_class_ordered_cache(folder, shards=2):
    """A latent cache whose rows are in class order (row i has label i // PER_K). Every array
    holds its row's index, so a batch shows which row landed where."""
    rows = CLASSES_K * PER_K
    ident = dict(kind=LATENTS, format=FORMAT_VERSION, tokenizer="e2e-invae", tokenizer_settings={},
                 tokenizer_random=True, latent_shape=[1, 1, 1], resolution=16, teacher="dinov2_vits14",
                 teacher_random=True, teacher_dim=2, teacher_tokens=1, noise_seed=0, batch_size=rows // shards,
                 precision="fp32", moments=False, images_file="none", images_checksum="none", images_rows=rows,
                 num_classes=CLASSES_K, class_names=[f"n{c:08d}" for c in range(CLASSES_K)])
    datasets = {"latents": ((1, 1, 1), np.float32), "labels": ((), np.int64),
                "teacher_cls": ((2,), np.float16), "teacher_tokens": ((1, 2), np.float16)}
    paths = []
    for shard in range(shards):
        start, stop = split_range(rows, shard, shards)
        r = np.arange(start, stop)
        with ShardWriter(shard_path(folder, shard), datasets, dict(ident, row_start=start, row_stop=stop),
                         capacity=stop - start) as w:
            w.append(latents=r.astype(np.float32).reshape(-1, 1, 1, 1), labels=r // PER_K,
                     teacher_cls=np.stack([r, -r], 1).astype(np.float16),       # exact: |r| < 2048
                     teacher_tokens=np.stack([-r, r], 1).astype(np.float16)[:, None])
            paths.append(w.finish())
    return join_latents(paths, folder / "cache.h5")


@pytest.fixture(scope="module")
def class_ordered(tmp_path_factory):
    return write_class_ordered_cache(tmp_path_factory.mktemp("class_ordered"))


def random_pair_stats(labels: np.ndarray) -> tuple[float, float, float, int]:
    """For a pair of distinct rows drawn at random: P(same class), and the mean, standard
    deviation and median of the class gap |y_a - y_b| (exact, from the class counts)."""
    counts = np.bincount(labels).astype(np.float64)
    n = counts.sum()
    gap = np.abs(np.arange(len(counts))[:, None] - np.arange(len(counts))[None, :])
    pairs = np.outer(counts, counts) - np.diag(counts)         # ordered pairs of distinct rows per class pair
    p = pairs / (n * (n - 1))
    mean = float((p * gap).sum())
    cdf = np.cumsum(np.bincount(gap.ravel(), weights=p.ravel()))
    return (float(p.diagonal().sum()), mean, float(np.sqrt((p * gap ** 2).sum() - mean ** 2)),
            int(np.searchsorted(cdf, 0.5)))


def test_cfm_negatives_are_random_pairs_on_a_class_ordered_cache(class_ordered):
    """CFM's negative is torch.roll(batch, 1): on a cache written in class order, the rolled
    partner's class must be as random as with a shuffled DataLoader. Micro-batches sorted by row
    (the old loader) pair neighbouring classes: here same-class 0.136 instead of 0.0095, class
    gap mean 5.9 and median 2 instead of 33.5 and 29."""
    world, micro, epochs = 2, 32, 2
    loaders = [make_train_loader(class_ordered, micro_batch=micro, rank=r, world_size=world, seed=3, num_workers=2)
               for r in range(world)]
    per_epoch = loaders[0].batches_per_epoch                    # 2000 // 64 = 31
    batches = [list(itertools.islice(loader, epochs * per_epoch)) for loader in loaders]
    labels = np.arange(CLASSES_K * PER_K) // PER_K
    y = torch.stack([b["label"] for rank in batches for b in rank])    # (micro-batches, B): what the loss sees
    partner = torch.roll(y, 1, dims=1)                         # srdit.transport: torch.roll(v, 1, dims=0)
    same, gap = (y == partner).double(), (y - partner).abs().double()
    n = same.numel()                                           # 124 micro-batches x 32 = 3968 pairs
    p_same, mean_gap, sd_gap, median_gap = random_pair_stats(labels)       # 0.0095, 33.5, 23.6, 29
    print(f"same-class {same.mean().item():.4f} (random {p_same:.4f}), gap mean {gap.mean().item():.2f} "
          f"(random {mean_gap:.2f}), median {gap.median().item():.0f} (random {median_gap})")
    # a fixed seed, so deterministic; about 4 standard errors of a random pairing either way
    assert abs(same.mean().item() - p_same) <= 4 * np.sqrt(p_same * (1 - p_same) / n)
    assert abs(gap.mean().item() - mean_gap) <= 4 * sd_gap / np.sqrt(n)
    assert abs(gap.median().item() - median_gap) <= 3
    # and the pairing is as random at every position of the micro-batch (the wrap-around included)
    first, rest = gap[:, 0].mean().item(), gap[:, 1:].mean().item()
    assert abs(first - rest) <= 4 * sd_gap * np.sqrt(1 / len(y) + 1 / (n - len(y)))

    for r in range(world):
        sampler = EpochBatchSampler(CLASSES_K * PER_K, micro, r, world, seed=3)
        for k, batch in enumerate(batches[r]):
            index = batch["index"].numpy()
            epoch, j = divmod(k, per_epoch)
            lo = j * micro * world + r * micro
            assert np.array_equal(index, sampler.permutation(epoch)[lo:lo + micro])    # the permutation's order
            # every array is in the index's order (each row's values were its index)
            assert np.array_equal(batch["latent"].reshape(-1).numpy(), index.astype(np.float32))
            assert np.array_equal(batch["label"].numpy(), labels[index])
            assert np.array_equal(batch["teacher_cls"].numpy(), np.stack([index, -index], 1).astype(np.float32))
            tokens = np.stack([-index, index], 1).astype(np.float32)
            assert np.array_equal(batch["teacher_tokens"][:, 0].numpy(), tokens)


def test_random_order_resumes_exactly(class_ordered):
    """The order inside each micro-batch after a resume is the uninterrupted run's."""
    for rank in range(2):
        whole = make_train_loader(class_ordered, micro_batch=32, rank=rank, world_size=2, seed=5, num_workers=3)
        uninterrupted = [b["index"] for b in _take(whole, 70)]             # crosses two epoch boundaries
        first = make_train_loader(class_ordered, micro_batch=32, rank=rank, world_size=2, seed=5, num_workers=2)
        _take(first, 40)
        resumed = make_train_loader(class_ordered, micro_batch=32, rank=rank, world_size=2, seed=5, num_workers=0)
        resumed.load_state_dict(first.state_dict())
        after = _take(resumed, 30)
        for a, b in zip(uninterrupted[40:], after):
            assert torch.equal(a, b["index"])
            assert torch.equal(b["latent"].reshape(-1), b["index"].float())
        assert not any(torch.equal(i, i.sort().values) for i in uninterrupted)     # never sorted
