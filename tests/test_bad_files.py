"""Issue 21: files that go bad, folders that change, and listing a folder once: ``bad_images: skip``, the
file-list check at resume, the manifest of the file list."""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    age_folders,
    assert_no_worker_traceback,
    base_args,
    error_lines,
    make_image_folder,
    read_summary,
    torchrun,
)

from dml_dist import DMLError
from dml_dist.checkpoint.checkpointer import Checkpointer, check_file_list
from dml_dist.config import build_config
from dml_dist.data import BatchPlan
from dml_dist.data.folders import files_changed, manifest_path, scan
from dml_dist.data.shares import FileImageDataset, Shares


def _break(path):
    path.write_bytes(path.read_bytes()[:40])  # a truncated PNG: neither TorchCodec nor PIL reads it


def test_skip_replaces_a_bad_file_names_it_once_and_counts_it(tmp_path):
    """Two ranks decode shares of every batch (stream path, 1 worker each), 2 epochs: the unreadable file is
    met in both epochs, on whichever rank decodes it, and the run goes on; rank 0 names it once."""
    data = make_image_folder(tmp_path / "data", n_train=8, n_val=2)
    _break(data / "train" / "dog" / "0003.png")
    r = torchrun(2, base_args(tmp_path, data, loader="stream", bad_images="skip", num_workers=1))
    assert r.returncode == 0, r.stderr[-3000:]
    named = [line for line in r.stdout.splitlines() if "bad_images=skip" in line]
    assert len(named) == 1 and "dog/0003.png" in named[0] and "grey stand-in" in named[0], named
    summary = read_summary(tmp_path)
    assert summary["bad_images_skipped"] == 1 and len(summary["history"]) == 2


def test_skip_stand_in_is_deterministic_grey_on_both_decode_paths(tmp_path):
    """The worker path and the device path's CPU twin put the same stand-in where the bad file was."""
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_train=4, n_val=0, splits=("train",))
    _break(data / "train" / "b" / "0001.png")
    (data / "train" / "a" / "0002.png").write_bytes(b"")  # an empty file: no bytes for the batched decode
    files = scan(str(data / "train"))
    ds = FileImageDataset(files, 16)
    ds.bad_images = "skip"
    plan = BatchPlan(len(ds), 8, seed=0)
    share, _, error, indices, skipped = Shares(ds, plan, 8, (0, 1))[0]
    assert error is None and sorted(indices) == list(range(8))
    assert sorted(p.rsplit("/", 2)[1] + "/" + p.rsplit("/", 1)[1] for p, _ in skipped) == ["a/0002.png", "b/0001.png"]
    bad = [j for j, i in enumerate(plan.indices(0, 0).tolist()) if files.relpath(i) in ("a/0002.png", "b/0001.png")]
    assert len(bad) == 2 and all(bool((share[j] == 128).all()) for j in bad)
    ds.decode_device = "cuda"  # the workers read (and decode what is not a JPEG); decode_share decodes the rest
    from dml_dist.data.shares import decode_share

    raws, _, error, _, in_worker = Shares(ds, plan, 8, (0, 1))[0]
    again = []
    assert torch.equal(decode_share(*raws[:2], ds, torch.device("cpu"), 8, again), share)
    assert [p.rsplit("/", 1)[1] for p, _ in in_worker] == ["0001.png"] and len(again) == 1  # the PNG; the empty file
    ds.bad_images = "stop"  # and without skip each is one clear line, not a traceback
    item = Shares(ds, plan, 8, (0, 1))[0]
    assert "cannot read image" in item[2] and "0001.png" in item[2]  # the worker met the PNG
    ((path, _),) = [(p, d) for p, d in in_worker]
    kept = [(p, d) for p, d in raws[0] if p != path]  # without it, the rank meets the empty file
    with pytest.raises(DMLError, match="cannot read image .*0002.png"):
        decode_share(kept, None, ds, torch.device("cpu"), 8)


def test_resume_on_a_changed_folder_is_one_line_unless_allowed(tmp_path):
    data = make_image_folder(tmp_path / "data", n_train=8, n_val=2)
    r = torchrun(2, base_args(tmp_path, data, epochs=1))
    assert r.returncode == 0, r.stderr[-3000:]
    os.remove(data / "train" / "cat" / "0000.png")
    for name in ("extra1.png", "extra2.png"):
        (data / "train" / "frog" / name).write_bytes((data / "train" / "frog" / "0001.png").read_bytes())
    # The check rank 0's checkpointer makes before a resume, in-process on the real checkpoint, the changed folder's
    # list and the default config (that a refusal ends every rank with its line under torchrun, and keeps the file:
    # tests/test_checkpoint.py, the other architecture)
    latest = tmp_path / "ckpt" / "t_latest.pth"
    ckpt = torch.load(latest, weights_only=True)
    now = {"hashes": torch.from_numpy(scan(str(data / "train")).path_hashes())}
    rank0 = SimpleNamespace(cfg=build_config(), _file_record=lambda: now, logger=None)
    with pytest.raises(DMLError) as e:
        Checkpointer._check_files(rank0, ckpt, str(latest))
    line = str(e.value)
    assert "training file list changed" in line and "2 file(s) added, 1 removed" in line, line
    assert "allow_data_change=true" in line and "\n" not in line
    assert check_file_list(ckpt["files"], ckpt["files"], str(latest), allow=False) is None  # nothing changed
    r = torchrun(2, base_args(tmp_path, data, epochs=2, resume="auto", allow_data_change=True))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "allow_data_change: the training file list changed" in r.stdout and "2 file(s) added, 1 removed" in r.stdout
    assert [h["epoch"] for h in read_summary(tmp_path)["history"]] == [1, 2]


def test_the_list_is_one_buffer_and_its_subsets_and_hashes_hold(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_train=3, n_val=0, splits=("train",))
    long_name = "x" * 200 + ".png"
    (data / "train" / "b" / long_name).write_bytes((data / "train" / "b" / "0000.png").read_bytes())
    files = scan(str(data / "train"))
    expected = ["a/0000.png", "a/0001.png", "a/0002.png", "b/0000.png", "b/0001.png", "b/0002.png", f"b/{long_name}"]
    assert [files.relpath(i) for i in range(len(files))] == expected and files.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert files.blob.nbytes == sum(len(p) for p in expected)  # no padding to the longest path
    assert files.sizes is None  # nothing was stat'ed
    sub = files.subset([6, 1, 3])
    assert [sub.relpath(i) for i in range(3)] == [expected[6], expected[1], expected[3]]
    assert sub.labels.tolist() == [1, 0, 1]
    assert files_changed(files.path_hashes(), sub.path_hashes()) == (0, 4)
    key = files.key(16)
    assert files.sizes is not None and files.key(16) == key


def test_the_manifest_is_reused_until_a_class_folder_changes(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), n_train=3, n_val=0, splits=("train",))
    root, cache, log = str(data / "train"), str(tmp_path / "cache"), []
    age_folders(data)
    first = scan(root, cache, log.append)
    assert "listed 6" in log[-1] and os.path.isfile(manifest_path(cache, root))
    again = scan(root, cache, log.append)
    assert "from the manifest" in log[-1]
    assert np.array_equal(first.blob, again.blob) and np.array_equal(first.offsets, again.offsets)
    (data / "train" / "b" / "new.png").write_bytes((data / "train" / "b" / "0000.png").read_bytes())
    age_folders(data, 1800)  # b's time moved (as adding the file moved it), and is not within a tick
    third = scan(root, cache, log.append)
    assert "listed 7" in log[-1] and len(third) == 7
    scan(root, cache, log.append)
    assert "from the manifest" in log[-1]  # the new listing's manifest, reused
    (data / "train" / "a" / "late.png").write_bytes((data / "train" / "a" / "0000.png").read_bytes())
    listed = scan(root, cache, log.append)  # a folder changed just now: within a clock tick, never trusted
    assert "listed 8" in log[-1] and len(listed) == 8
    with open(manifest_path(cache, root), "wb") as f:
        f.write(b"garbled")
    assert len(scan(root, cache, log.append)) == 8 and "listed 8" in log[-1]


def test_skip_on_the_memory_path_has_a_cache_entry_of_its_own_and_is_reported_each_start(tmp_path):
    """The cache entry built with skip holds stand-ins: it is reported at every start that uses it (the
    trainer counts ``Datasets.skipped``), and a later ``stop`` run never takes it for a clean one."""
    from dml_dist import create_dml_config
    from dml_dist.data import build_datasets

    data = make_image_folder(tmp_path / "data", n_train=4, n_val=2)
    _break(data / "train" / "dog" / "0003.png")
    cfg = dict(data_dir=str(data), cache_dir=str(tmp_path / "cache"), loader="memory", image_size=16)
    for _ in range(2):  # built, then read back
        built = build_datasets(create_dml_config(bad_images="skip", **cfg))
        assert [p.rsplit("/", 2)[-2:] for p, _ in built.skipped] == [["dog", "0003.png"]]
        assert bool((built.train.images == 128).all(dim=(1, 2, 3)).any())
    with pytest.raises(DMLError, match="cannot read image .*0003.png"):
        build_datasets(create_dml_config(**cfg))


def test_no_checkpoint_holds_a_step_trained_on_the_stand_in_zeros(tmp_path):
    """bad_images=stop (the default) on the stream path, the file met mid-epoch by a rank's loader worker: every
    rank stops with one line naming the file and the skip option. The rank that meets the file trains on zeros
    until the next check (the meter gather before a save, at print_freq, at the end of the epoch). With a save
    after every step, the job stops at the first save after the file's step, and the latest checkpoint is the one
    before it. (A truncated JPEG is named alike: tests/test_stream.py, in-process.)"""
    data = make_image_folder(tmp_path / "data", n_train=8, n_val=2)  # 24 train images: 6 steps of 4
    files = scan(str(data / "train"))
    bad = files.path(int(BatchPlan(len(files), 4, seed=42).indices(0, 3)[0]))  # a file of step 3, epoch 1
    with open(bad, "r+b") as f:
        f.truncate(40)
    r = torchrun(
        2,
        base_args(
            tmp_path,
            data,
            loader="stream",
            num_workers=1,
            batch_size=4,
            epochs=1,
            print_freq=100,
            save_every_steps=1,
            save_freq=0,
        ),
    )
    lines = error_lines(r.stderr)
    assert r.returncode != 0 and len(lines) == 1 and os.path.basename(bad) in lines[0], r.stderr[-3000:]
    assert "cannot read image" in lines[0] and "bad_images=skip" in lines[0]  # the file, and the option
    assert_no_worker_traceback(r.stderr)
    latest = torch.load(tmp_path / "ckpt" / "t_latest.pth", weights_only=True)
    assert latest["epoch"] == 0 and latest["step"] == 3, (latest["epoch"], latest["step"])  # steps 0-2, not 3
