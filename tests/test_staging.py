"""Node-local staging of the training cache (srdit/staging.py): the copy keeps the layout the
latent cache needs (its image cache too when the teacher runs online), is verified against the
checksums recorded at build time, is reused when already verified, and refuses a corrupt copy,
a full disk and an unset environment variable. The workflow side (config stage_dir on a real
run) is in tests/test_retention.py."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_train import write_caches

from srdit.data.cache import LATENTS, open_cache
from srdit.data.dataset import TrainDataset
from srdit.staging import MARKER, StagingError, expand_stage_dir, stage_cache


@pytest.mark.parametrize("teacher_features", [True, False], ids=["cached-teacher", "online-teacher"])
def test_staged_cache_is_verified_and_reads_the_same(tmp_path, teacher_features):
    cache = write_caches(tmp_path / "shared" / "cache", teacher_features=teacher_features)
    logs = []
    staged = stage_cache(cache, tmp_path / "node", log=logs.append)
    assert staged.exists() and tmp_path / "node" in staged.parents
    assert "verified" in logs[-1]
    original, copy = TrainDataset(cache), TrainDataset(staged)
    rows = np.arange(len(original))
    for key, value in original[rows].items():
        assert np.array_equal(value.numpy(), copy[rows][key].numpy()), key
    if not teacher_features:          # the online teacher reads images: they came along
        assert copy.images is not None and copy.images.index.path != original.images.index.path
        assert tmp_path / "node" in copy.images.index.path.parents
    marker = json.loads((staged.parent / MARKER).read_text())
    assert marker["source"] == str(cache.resolve()) or marker["source"].endswith("cache.h5")
    # a second job on the node reuses the verified copy
    again = stage_cache(cache, tmp_path / "node", log=logs.append)
    assert again == staged and "reusing" in logs[-1]


def test_a_corrupt_copy_is_refused_and_deleted(tmp_path, monkeypatch):
    cache = write_caches(tmp_path / "shared", teacher_features=True)
    import srdit.staging as staging

    real_copy = staging._copy

    def corrupting_copy(src, dst):
        real_copy(src, dst)
        if dst.name.startswith("latents-"):          # the shard: flip latent values in the copy
            with h5py.File(dst, "r+") as f:
                f["latents"][0] = f["latents"][0] + 1.0
    monkeypatch.setattr(staging, "_copy", corrupting_copy)
    with pytest.raises(StagingError, match="checksum"):
        stage_cache(cache, tmp_path / "node")
    assert not any((tmp_path / "node" / "srdit-stage").iterdir())


def test_stage_dir_variables_and_space(tmp_path, monkeypatch):
    monkeypatch.setenv("SRDIT_TEST_NODE", str(tmp_path / "n"))
    assert expand_stage_dir("$SRDIT_TEST_NODE/x") == tmp_path / "n" / "x"
    monkeypatch.delenv("SRDIT_TEST_NODE")
    with pytest.raises(StagingError, match="not set"):
        expand_stage_dir("$SRDIT_TEST_NODE")
    cache = write_caches(tmp_path / "shared", teacher_features=True)
    import shutil as sh
    import srdit.staging as staging
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10, 10, 1))
    with pytest.raises(StagingError, match="GB free"):
        stage_cache(cache, tmp_path / "node")
    open_cache(cache, LATENTS, verify=True)          # the source is untouched


def test_caches_are_read_without_hdf5_file_locks(tmp_path):
    """srdit reads caches without HDF5 file locks (HDF5_USE_FILE_LOCKING=FALSE unless set, from
    srdit.data.cache): it opens a cache even while another process holds a shard open for
    writing, which with locks fails at once, as locking does on network file systems without
    lock support."""
    import os
    import subprocess
    import sys

    cache = write_caches(tmp_path / "shared", teacher_features=True)
    shard = next(tmp_path.glob("shared/latents-*.h5"))
    locking = dict(os.environ, HDF5_USE_FILE_LOCKING="TRUE")
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys\n"
                               f"f = h5py.File({str(shard)!r}, 'a')\nprint('open', flush=True)\nsys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=locking)
    try:
        assert holder.stdout.readline().strip() == "open"
        with_locks = subprocess.run([sys.executable, "-c", f"import h5py; h5py.File({str(shard)!r}, 'r')"],
                                    capture_output=True, text=True, env=locking)
        assert with_locks.returncode != 0 and "lock" in with_locks.stderr
        without = subprocess.run([sys.executable, "-c", "from srdit.data.dataset import TrainDataset; import numpy;"
                                  f"print(TrainDataset({str(cache)!r})[numpy.arange(4)]['latent'].shape)"],
                                 capture_output=True, text=True,
                                 env={k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"})
        assert without.returncode == 0, without.stderr[-2000:]
        assert "torch.Size([4, 32, 4, 4])" in without.stdout
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
