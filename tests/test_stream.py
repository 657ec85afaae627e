"""The data paths at scale: the stream path (cooperative decoding), the on-disk cache, real-world files,
the ImageNet transforms. In-process where the logic is local, real torchrun processes where ranks talk."""

import collections
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, _env, age_folders, kill_tree, run_cmd, torchrun
from PIL import Image
from torchvision.transforms import v2

from dml_dist import DMLError, create_dml_config
from dml_dist.data import build_datasets, make_eval_loader, make_train_loader
from dml_dist.data.cache import cached_images
from dml_dist.data.folders import scan
from dml_dist.data.images import RRC_TRIES, center_resize, decode_file, resized_crop, rrc_boxes
from dml_dist.data.shares import FileImageDataset

STREAM = dict(loader="stream", image_size=16, crop_fraction=0.875, batch_size=12)


def make_jpeg_folder(root, classes=3, per_class=12, seed=0):
    """JPEGs of varied, non-square sizes (the shape of ImageNet, in miniature)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / "train" / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(24, 40)), int(rng.integers(24, 40))
            img = np.clip(rng.normal(60 + 70 * c, 50, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:03d}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs") / "data")


def _cfg(data_dir, tmp_path, **kw):
    return create_dml_config(data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"), **{**STREAM, **kw})


def test_stream_batches_equal_memory_batches_without_rrc(jpeg_dir, tmp_path):
    """Same files, same (seed, epoch, step): the stream path decodes what the memory path cached, and the
    batch augmentations run on both alike, so the batches are byte-identical (training and evaluation)."""
    ops = ["crop", "flip", "jitter"]
    mem = build_datasets(_cfg(jpeg_dir, tmp_path, loader="memory", augment=ops))
    stream = build_datasets(_cfg(jpeg_dir, tmp_path, augment=ops, cache_eval=False))
    assert mem.path == "memory" and stream.path == "stream" and len(stream.train) == len(mem.train) == 32
    loaders = [make_train_loader(d.train, 12, seed=5, num_workers=w) for d, w in ((mem, 0), (stream, 2))]
    for loader in loaders:
        loader.set_epoch(1, start_step=1)
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == 1
    assert torch.equal(batches[0][0][0], batches[1][0][0]) and torch.equal(batches[0][0][1], batches[1][0][1])
    evals = [list(make_eval_loader(d.val, 5, 0, device="cpu")) for d in (mem, stream)]
    assert torch.equal(torch.cat([x for x, _ in evals[0]]), torch.cat([x for x, _ in evals[1]]))
    # cache_eval (the default): the stream path's val/test are decoded once into the cache, the same bytes
    log = []
    cached = build_datasets(_cfg(jpeg_dir, tmp_path, augment=ops), log=log.append)
    assert cached.path == "stream" and "val/test from the cache" in cached.why
    assert isinstance(cached.train, FileImageDataset) and not isinstance(cached.val, FileImageDataset)
    assert torch.equal(
        torch.cat([x for x, _ in make_eval_loader(cached.val, 5, 0, device="cpu")]), torch.cat([x for x, _ in evals[1]])
    )


def test_auto_chooses_the_path_and_says_why(jpeg_dir, tmp_path):
    small = build_datasets(_cfg(jpeg_dir, tmp_path, loader="auto"))
    assert small.path == "memory" and "fits the budget" in small.why
    tight = build_datasets(_cfg(jpeg_dir, tmp_path, loader="auto", memory_budget_gb=1e-6))
    assert tight.path == "stream" and "exceeds the budget of 0.00 GB (memory_budget_gb)" in tight.why
    rrc = build_datasets(_cfg(jpeg_dir, tmp_path, loader="auto", augment=["rrc", "flip"]))
    assert rrc.path == "stream" and "rrc" in rrc.why
    with pytest.raises(DMLError, match="loader=memory cannot apply rrc"):
        build_datasets(_cfg(jpeg_dir, tmp_path, loader="memory", augment=["rrc"]))


def test_replica_shards_of_a_streamed_batch_make_the_whole_batch(jpeg_dir, tmp_path):
    """With replicas each rank takes its shard after the node's gather: shards 0 and 1 of 2, side by side,
    are the batch of one replica."""
    ds = build_datasets(_cfg(jpeg_dir, tmp_path, augment=["rrc", "flip", "jitter"])).train
    batches = []
    for shard in ((0, 1), (0, 2), (1, 2)):
        loader = make_train_loader(ds, 8, seed=1, shard=shard)
        loader.set_epoch(2)
        batches.append(next(iter(loader)))
    assert batches[1][0].shape[0] == 4
    assert torch.equal(torch.cat([batches[1][0], batches[2][0]]), batches[0][0])
    assert torch.equal(torch.cat([batches[1][1], batches[2][1]]), batches[0][1])


def test_transforms_agree_with_torchvision(jpeg_dir):
    """Evaluation: torchvision's Resize(floor(S / 0.875)) + CenterCrop(S); RandomResizedCrop: its box rule
    and its crop-then-resize, per sample; within a small tolerance of the PIL reference."""
    path = next((jpeg_dir / "train" / "c1").iterdir())
    img, pil = decode_file(str(path)), Image.open(path).convert("RGB")
    ref = v2.functional.pil_to_tensor(v2.CenterCrop(32)(v2.Resize(36)(pil)))  # 36 = floor(32 / 0.875)
    ours = center_resize(img, 32, 0.875)
    # PIL resamples a little apart from torchvision's tensor kernels: up to 0.03 grey levels on these files here
    # (another decoder build may differ a little more; the exact check below is against torchvision's tensor ops)
    assert ours.shape == (3, 32, 32) and (ours.float() - ref.float()).abs().mean() < 0.5
    # torchvision's own tensor ops, exactly: its output size rule and its centre-crop rounding, for any shape
    for h, w in ((347, 500), (500, 281), (29, 38), (37, 37), (300, 301)):
        x = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h))
        tv = v2.functional.center_crop(v2.functional.resize(x, [146], antialias=True), [128])
        assert torch.equal(center_resize(x, 128, 0.875), tv), (h, w)
    g = torch.Generator().manual_seed(0)
    boxes = [
        rrc_boxes(torch.rand(RRC_TRIES, 4, generator=g), 300, 500, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(500)
    ]
    scales = np.array([h * w / (300 * 500) for _, _, h, w in boxes])
    ratios = np.array([w / h for _, _, h, w in boxes])
    assert all(0 <= t and 0 <= left and t + h <= 300 and left + w <= 500 for t, left, h, w in boxes)
    assert scales.min() > 0.07 and scales.max() <= 1.0 and ratios.min() > 0.74 and ratios.max() < 1.34
    # The same distribution as torchvision's own RandomResizedCrop.get_params (2,000 draws each).
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    tv = [RandomResizedCrop.get_params(torch.empty(3, 300, 500), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(2000)]
    tv_scales = np.array([h * w / (300 * 500) for _, _, h, w in tv])
    more = [
        rrc_boxes(torch.rand(RRC_TRIES, 4, generator=g), 300, 500, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(1500)
    ]
    scales = np.concatenate([scales, [h * w / (300 * 500) for _, _, h, w in more]])
    assert abs(scales.mean() - tv_scales.mean()) < 0.025 and abs(np.median(scales) - np.median(tv_scales)) < 0.04
    # The aspect ratio is log-uniform, as torchvision draws it: on a wide range (1/4..4) with boxes that always
    # fit, its log's quartiles are about -0.69, 0, 0.69 (a uniform ratio would put the median near log 2.1).
    wide = [
        rrc_boxes(torch.rand(RRC_TRIES, 4, generator=g), 1000, 1000, (0.01, 0.05), (0.25, 4.0)) for _ in range(2000)
    ]
    tv_wide = [RandomResizedCrop.get_params(torch.empty(3, 1000, 1000), [0.01, 0.05], [0.25, 4.0]) for _ in range(2000)]
    q = [np.quantile([np.log(w / h) for _, _, h, w in b], [0.25, 0.5, 0.75]) for b in (wide, tv_wide)]
    assert np.abs(q[0] - q[1]).max() < 0.12 and np.abs(q[0] - [-0.69, 0.0, 0.69]).max() < 0.12, q
    # All tries rejected -> torchvision's fallback: the whole image clamped to the ratio range, centred.
    assert rrc_boxes(torch.ones(RRC_TRIES, 4), 100, 400, (0.9, 1.0), (1.0, 1.0)) == (0, 150, 100, 100)
    u = torch.rand(RRC_TRIES, 4, generator=g)
    t, left, h, w = rrc_boxes(u, img.shape[1], img.shape[2], (0.08, 1.0), (3 / 4, 4 / 3))
    ours = resized_crop(img, u, 16, (0.08, 1.0), (3 / 4, 4 / 3))
    assert torch.equal(ours, v2.functional.resized_crop(img, t, left, h, w, [16, 16], antialias=True))  # exactly
    ref = v2.functional.pil_to_tensor(v2.functional.resized_crop(pil, t, left, h, w, [16, 16], antialias=True))
    assert (ours.float() - ref.float()).abs().mean() < 1.0  # PIL: up to 0.26 grey levels on these files here


def test_real_world_files_decode_and_a_truncated_jpeg_is_named(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    files = {
        "cmyk.JPEG": lambda p: rgb.convert("CMYK").save(p, "JPEG"),
        "grey.JPEG": lambda p: rgb.convert("L").save(p, "JPEG"),
        "png_named.JPEG": lambda p: rgb.save(p, "PNG"),
    }
    for name, write in files.items():
        write(tmp_path / name)
        ours = decode_file(str(tmp_path / name))
        ref = v2.functional.pil_to_tensor(Image.open(tmp_path / name).convert("RGB"))
        assert ours.shape == (3, 30, 40) and torch.equal(ours, ref), name
    rgb.save(tmp_path / "full.JPEG", "JPEG", quality=95)
    (tmp_path / "cut.JPEG").write_bytes((tmp_path / "full.JPEG").read_bytes()[:600])
    with pytest.raises(DMLError, match=r"cannot read image .*cut\.JPEG .*delete or replace the file"):
        decode_file(str(tmp_path / "cut.JPEG"))


def test_cache_is_reused_rebuilt_when_a_file_changes_and_never_used_damaged(jpeg_dir, tmp_path):
    files, cache = scan(str(jpeg_dir / "train")), str(tmp_path / "cache")
    log = []
    first, labels = cached_images(files, cache, "train", "train/", 16, 1.0, log.append)
    assert "decoded 36 images" in log[-1] and first.shape == (36, 3, 16, 16) and labels.tolist()[:2] == [0, 0]
    again, _ = cached_images(files, cache, "train", "train/", 16, 1.0, log.append)
    assert "read from" in log[-1] and torch.equal(first, again)
    entry = log[-1].rsplit(" ", 1)[1]
    # A mapping of the cache file, not a copy: the tensor's memory lies in a mapping of images.u8.
    ptr = again.untyped_storage().data_ptr()
    with open("/proc/self/maps") as f:
        maps = [line.split() for line in f if line.rstrip().endswith(os.path.join(entry, "images.u8"))]
    assert any(int(m[0].split("-")[0], 16) <= ptr < int(m[0].split("-")[1], 16) for m in maps)
    # A file changes (new content, new mtime): a new content key -> a new entry, decoded; the old one is left
    # as it is (another job may have it mapped).
    changed = jpeg_dir / "train" / "c0" / "000.JPEG"
    original = changed.read_bytes()
    try:
        Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(changed, "JPEG")
        rebuilt, _ = cached_images(scan(str(jpeg_dir / "train")), cache, "train", "train/", 16, 1.0, log.append)
        assert "decoded 36" in log[-1] and entry not in log[-1] and rebuilt[0].sum() < first[0].sum()
        assert torch.equal(first, again)  # the first entry's mapping still holds the old content
    finally:
        changed.write_bytes(original)
        files = scan(str(jpeg_dir / "train"))
    cached_images(files, cache, "train", "train/", 16, 1.0, log.append)
    entry = log[-1].split(" into ")[1].split(" in ")[0]  # the restored file's times: one more entry
    # Damage: flipped bytes, a truncated array, a garbled index -> detected, rebuilt, the same content again.
    for damage in ("flip", "truncate", "index"):
        images = os.path.join(entry, "images.u8")
        if damage == "flip":
            with open(images, "r+b") as f:
                f.seek(100)
                f.write(b"\xff\x00\xff")
        elif damage == "truncate":
            os.truncate(images, 1000)
        else:
            with open(os.path.join(entry, "index.json"), "w") as f:
                f.write("{garbled")
        again, _ = cached_images(files, cache, "train", "train/", 16, 1.0, log.append)
        assert "is damaged" in log[-2] and "decoded 36" in log[-1], (damage, log[-2:])
        assert torch.equal(again, first)
    # Age cleanup, at a start, by the stamp's age alone: of the two superseded 16 px entries, unused for 20
    # days, the stamped one goes and the unstamped one (built before stamps) is stamped and kept; the entry in
    # use, an aged entry of another size, and a build folder of the same prefix stay.
    cached_images(files, cache, "train", "train/", 8, 1.0, log.append)
    names = sorted(n for n in os.listdir(cache) if n.startswith("train_") and "." not in n)
    assert len(names) == 4, names
    month_ago = time.time() - 20 * 86400
    superseded = [n for n in names if os.path.join(cache, n) != entry and n.startswith("train_16px_")]
    for name in names:
        if os.path.join(cache, name) != entry:
            os.utime(os.path.join(cache, name, "last_used"), (month_ago, month_ago))
    os.remove(os.path.join(cache, superseded[1], "last_used"))
    building = os.path.join(cache, superseded[0] + ".tmp-otherhost-1")
    os.makedirs(building)
    os.utime(building, (month_ago, month_ago))
    cached_images(files, cache, "train", "train/", 16, 1.0, log.append, keep_days=0)  # 0: keep every entry
    assert sorted(n for n in os.listdir(cache) if n.startswith("train_") and "." not in n) == names
    cached_images(files, cache, "train", "train/", 16, 1.0, log.append, keep_days=14)
    removed = [line for line in log if "superseded and unused for 20 days" in line]
    left = sorted(n for n in os.listdir(cache) if n.startswith("train_") and "." not in n)
    assert len(removed) == 1 and superseded[0] in removed[0] and superseded[0] not in left, (removed, left)
    assert len(left) == 3 and os.path.basename(entry) in left and superseded[1] in left and os.path.isdir(building)
    assert os.stat(os.path.join(cache, superseded[1], "last_used")).st_mtime > time.time() - 60
    assert any(n.startswith("train_8px_") for n in left)


def _probe_args(data_dir, tmp_path, **kw) -> list[str]:
    """dml_dist.tools.probe's arguments: the stream path at 16 px, batches of 8, the whole epoch, unless ``kw``."""
    keys = {"data_dir": data_dir, "cache_dir": tmp_path / "cache", "steps": 0, **STREAM, "batch_size": 8}
    return [f"{k}={v}" for k, v in {**keys, "augment": "[rrc,flip,jitter]", **kw}.items()]


def _probe(nproc, data_dir, tmp_path, torchrun_args=(), **kw):
    args = _probe_args(data_dir, tmp_path, **kw)
    r = torchrun(nproc, args, module="dml_dist.tools.probe", torchrun_args=torchrun_args)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_stream_batches_are_identical_on_every_rank_for_any_ranks_workers_and_resume(jpeg_dir, tmp_path):
    """One process decoding every batch itself (the probe in this process: no launcher, no workers), and 3 ranks
    with 2 workers each decoding a third, started in the middle of the epoch: the same bytes; the node decodes
    each batch once in all. (A multi-rank gather without workers: the 4-rank probe of the two-node test below.)"""
    from dml_dist.tools.probe import main as probe_here

    out = tmp_path / "alone.jsonl"
    threads = torch.get_num_threads()  # a process without a launcher takes every CPU: put back for later tests
    try:
        assert probe_here(_probe_args(jpeg_dir, tmp_path, num_workers=0, epoch=1, device="cpu", out=out)) == 0
    finally:
        torch.set_num_threads(threads)
    alone = json.loads(out.read_text().splitlines()[-1])
    three = _probe(3, jpeg_dir, tmp_path, num_workers=2, epoch=1, start_step=1, device="cpu")
    # 36 images, 4 held out for validation: 4 steps of 8
    assert alone["path"] == "stream" and alone["world_size"] == 1 and len(alone["ranks"][0]["fingerprints"]) == 4
    ref = alone["ranks"][0]["fingerprints"]
    for r in three["ranks"]:
        assert r["fingerprints"] == ref[1:]
    # shares of ceil(8 / L): the whole batch for 1 process; 3 + 3 + 2 for 3 ranks
    assert alone["ranks"][0]["decoded"] == 32 and [r["decoded"] for r in three["ranks"]] == [9, 9, 6]


def _cache_lines(rank: dict) -> list[str]:
    """A probe rank's cache lines, without the waits for another node's build."""
    return [line for line in rank["log"] if line.startswith("cache:") and "waiting for" not in line]


@pytest.fixture(scope="module")
def two_node_cache(jpeg_dir, tmp_path_factory):
    """Two nodes of 2 ranks, one peer per rank, memory path, both starting on an empty cache_dir: read by the
    two tests below (the second starts one node on the cache and manifest this run left)."""
    age_folders(jpeg_dir)  # the manifest trusts folders unchanged for longer than a clock tick
    tmp = tmp_path_factory.mktemp("two_node_cache")
    kw = dict(data_dir=jpeg_dir, cache_dir=tmp / "cache", loader="memory", augment="[crop,flip]", device="cpu")
    return tmp / "cache", two_node_probe(tmp, "memory", **kw)


def test_cache_is_built_by_one_process_per_node_and_mapped_by_the_others(jpeg_dir, tmp_path, two_node_cache):
    """The cold start is the two-node run (test_two_nodes_build_the_shared_cache_once); then one node of 2 ranks
    starts on the cache and manifest it left: rank 0 reads both splits from the cache, the other rank maps them,
    and the file list comes from the manifest. Rank 0 alone lists the folders (README promise), on the cold start
    and on the warm one; the others receive its list."""
    cache_dir, cold = two_node_cache  # who built what on the cold start: the two-node test's checks
    warm = _probe(2, jpeg_dir, tmp_path, cache_dir=cache_dir, loader="memory", augment="[crop,flip]", device="cpu")
    assert warm["path"] == "memory"
    cache = [_cache_lines(r) for r in warm["ranks"]]
    assert list(map(len, cache)) == [2, 0] and all("read from" in line for line in cache[0]), cache
    files = {
        run: [[line for line in r["log"] if line.startswith("files:")] for r in res["ranks"]]
        for run, res in (("cold", cold), ("warm", warm))
    }
    assert [len(f) for f in files["cold"]] == [1, 0, 0, 0] and "listed 36" in files["cold"][0][0], files["cold"]
    assert [len(f) for f in files["warm"]] == [1, 0] and "from the manifest" in files["warm"][0][0], files["warm"]
    assert "36 in" in files["warm"][0][0]
    # the warm start gives the cold start's batches (every cold rank has the same: the test below)
    assert all(r["fingerprints"] == cold["ranks"][0]["fingerprints"] for r in warm["ranks"])


def two_node_probe(tmp_path, name, nproc_per_node=2, **kw):
    """The data path alone on two torchrun agents (c10d rendezvous on localhost), 2 ranks each by default. The
    rendezvous store is held here on a port the OS picks (no bind-then-close race); both agents join it."""
    from datetime import timedelta

    rdzv = torch.distributed.TCPStore(
        "127.0.0.1", 0, is_master=True, multi_tenant=True, wait_for_workers=False, timeout=timedelta(seconds=240)
    )
    port = rdzv.port
    out = tmp_path / f"{name}.json"
    args = [f"{k}={v}" for k, v in {"steps": 0, **STREAM, "batch_size": 8, **kw, "out": out}.items()]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        f"--nproc_per_node={nproc_per_node}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        f"--rdzv_id={name}",
        "-m",
        "dml_dist.tools.probe",
        *args,
    ]
    procs = [
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO, start_new_session=True
        )
        for _ in range(2)
    ]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            kill_tree(p.pid)
        pytest.fail("two-node probe timed out")
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 * nproc_per_node
    assert sorted(r["node"] for r in result["ranks"]) == [0] * nproc_per_node + [1] * nproc_per_node
    return result


@pytest.mark.parametrize(
    "world,local,layout,order,parts,rows",
    [  # parts: each rank's (g, G) of its unit's rows; rows: each rank's (r, R) of the batch
        (2, 1, (1, 1), "peer", [(0, 1)] * 2, [(0, 1)] * 2),  # one peer per node: each node decodes every row
        (2, 2, (1, 1), "peer", [(0, 2), (1, 2)], [(0, 1)] * 2),  # one node: its two ranks split the batch
        # a node per replica index: its peers split their replica's rows
        (4, 2, (2, 2), "replica", [(0, 2), (1, 2)] * 2, [(0, 2), (0, 2), (1, 2), (1, 2)]),
        # peer-major over two nodes: no two ranks of a node share rows
        (4, 2, (2, 2), "peer", [(0, 1)] * 4, [(0, 2), (1, 2)] * 2),
        # uneven replica counts: a node's ranks decode the whole batch between them, each keeps its share
        (4, 2, (1, 3), "peer", [(0, 2), (1, 2)] * 2, [(0, 1)] * 4),
    ],
)
def test_the_decode_unit_is_the_nodes_ranks_that_train_on_the_same_rows(world, local, layout, order, parts, rows):
    """Who decodes what on the stream path (``decode_group``, without a process group: the plan alone): the
    ranks of one node that train on the same rows split them; a rank never counts on another node's decoding."""
    from dml_dist.distributed import DistContext, decode_group
    from dml_dist.distributed.placement import Placement

    cpu = Placement("cpu", "gloo", 1, False)
    units = [decode_group(DistContext(r, world, r % local, local, cpu, layout, order=order)) for r in range(world)]
    assert [(part, row) for _, part, row in units] == list(zip(parts, rows))


def test_two_nodes_build_the_shared_cache_once(two_node_cache):
    """Two nodes of 2 ranks, one peer per rank, memory path: each node's local rank 0 builds the (shared) cache
    folder, the first to finish wins, and the other node uses it; the same batches on every rank. The stream path
    across nodes: the replicas case below, and who decodes what for one peer per node (each node all of every
    batch) in-process above."""
    _, result = two_node_cache
    ranks = result["ranks"]
    assert result["path"] == "memory"
    for node in (0, 1):  # the node's local rank 0 dealt with the cache (built it, or took the other node's)
        logs = [_cache_lines(r) for r in ranks if r["node"] == node]  # rank order: local rank 0 first
        assert list(map(len, logs)) == [2, 0], logs
    # both nodes started on the empty cache_dir together: each split was decoded once
    built = [line for r in ranks for line in r["log"] if "images into" in line]
    folders = sorted(line.split(" into ")[1].split("/")[-1][:5] for line in built)
    assert len(built) == 2 and folders == ["train", "val_1"]
    assert all(r["fingerprints"] == ranks[0]["fingerprints"] for r in ranks) and len(ranks[0]["fingerprints"]) == 4


def test_two_nodes_with_replicas_decode_each_sample_once_per_job(jpeg_dir, tmp_path):
    """2 nodes x 2 ranks, 2 peers x 2 replicas: rank_order=auto places the peers of one replica index on one
    node, so each node decodes only its replica's rows, and every sample of every step is decoded exactly once
    in the whole job (counted per dataset index where the decoding happens). Each (peer, replica) gets the
    bytes it gets on one node (peer-major there, no workers) started in the middle of the epoch, for the steps
    both ran.
    Evaluation (stream, not cached) follows the same rule: each replica scores its rows of the batch, its
    node decodes only those, and every validation sample is decoded once in the job and scored once per peer."""
    common = dict(
        data_dir=jpeg_dir,
        cache_dir=tmp_path / "cache",
        model_num=2,
        replicas=2,
        loader="stream",
        augment="[rrc,flip,jitter]",
        num_workers=1,
    )
    two = two_node_probe(tmp_path, "replicas", **common, cache_eval=False, eval=True)
    assert collections.Counter(i for r in two["ranks"] for i in r["eval_decoded_indices"]) == {i: 1 for i in range(4)}
    for peer in (0, 1):
        mine = [r for r in two["ranks"] if r["peer"] == peer]
        assert sorted(i for r in mine for i in r["eval_positions"]) == list(range(4))
        assert all(r["eval_batches"] == [2] for r in mine)  # each replica works on the one batch, 2 rows each
    assert (
        two["rank_order"] == "replica"
        and "replica-major decodes each sample 1x per job, peer-major 2x" in two["rank_order_why"]
    )
    assert [(r["peer"], r["replica"]) for r in two["ranks"]] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    counts = collections.Counter(i for r in two["ranks"] for i in r["decoded_indices"])
    assert counts == {i: 1 for i in range(32)}  # 4 steps of 8 = the whole permutation of 32, each once
    # one node, 4 ranks (peer-major there), no workers, started at step 2 of the epoch: the same bytes per slot
    one = _probe(4, jpeg_dir, tmp_path, model_num=2, replicas=2, num_workers=0, start_step=2)
    assert one["rank_order"] == "peer" and "1x per job" in one["rank_order_why"]
    decoded = collections.Counter(i for r in one["ranks"] for i in r["decoded_indices"])
    assert len(decoded) == 16 and set(decoded.values()) == {1}  # steps 2 and 3: 16 samples, each once
    # the samples of steps 2 and 3 (each rank of two nodes decoded 2 rows per step, in step order)
    assert set(decoded) == {i for r in two["ranks"] for i in r["decoded_indices"][4:]}
    by_slot = {
        run: {(r["peer"], r["replica"]): r["fingerprints"] for r in res["ranks"]}
        for run, res in (("two", two), ("one", one))
    }
    assert len(by_slot["two"][(0, 0)]) == 4 and all(by_slot["one"][k] == v[2:] for k, v in by_slot["two"].items())
    assert by_slot["two"][(0, 0)] != by_slot["two"][(0, 1)]  # the replicas train on different rows
    assert by_slot["two"][(0, 0)] == by_slot["two"][(1, 0)]  # the peers on the same ones


def test_device_decode_path_cpu_twin_equals_the_worker_path(tmp_path):
    """decode_device=cuda reads the bytes in workers and decodes the share with one batched decode_jpeg
    call on the rank's device; on the CPU the same function must give the worker path's bytes. The worker
    decides per file from its header: a PNG named .JPEG and a CMYK JPEG are decoded in the worker, and the
    other files of their shares stay on the batched call (counted)."""
    from dml_dist.data.images import jpeg_batchable
    from dml_dist.data.shares import Shares, decode_share

    data = make_jpeg_folder(tmp_path / "data", classes=2, per_class=6)
    Image.fromarray(np.full((30, 20, 3), 99, np.uint8)).save(data / "train" / "c1" / "zz.JPEG", "PNG")
    Image.new("CMYK", (26, 22), (10, 200, 30, 5)).save(data / "train" / "c0" / "zz.JPEG", "JPEG")
    Image.fromarray(np.full((24, 28), 77, np.uint8)).save(data / "train" / "c0" / "zy.JPEG", "JPEG", progressive=True)
    assert [
        jpeg_batchable((data / "train" / c / n).read_bytes())
        for c, n in (("c1", "zz.JPEG"), ("c0", "zz.JPEG"), ("c0", "zy.JPEG"), ("c0", "000.JPEG"))
    ] == [False, False, True, True]
    ds = FileImageDataset(scan(str(data / "train")), STREAM["image_size"], STREAM["crop_fraction"], ["rrc", "flip"])
    from dml_dist.data import BatchPlan

    plan = BatchPlan(len(ds), 6, seed=3)
    names = []
    for step in range(len(plan)):
        for unit in (0, 1):
            cpu = Shares(ds, plan, 6, (unit, 2))[step]
            ds.decode_device = "cuda"  # what the workers do then: read the files only
            raw = Shares(ds, plan, 6, (unit, 2))[step]
            ds.decode_device = "cpu"
            assert cpu[2] is None and raw[2] is None
            counts = {}
            assert torch.equal(decode_share(*raw[0][:2], ds, torch.device("cpu"), 3, counts=counts), cpu[0])
            in_worker = [name for name, d in raw[0][0] if isinstance(d, torch.Tensor)]
            assert all(n.endswith("zz.JPEG") for n in in_worker)
            assert counts == {"batched": len(raw[0][0]) - len(in_worker), "worker": len(in_worker)}
            names += in_worker
    assert sorted(n.rsplit("/", 2)[1] for n in names) == ["c0", "c1"]  # both odd files met, each in the worker
    with pytest.raises(DMLError, match="decode_device=cuda decodes on the training GPU"):
        ds.decode_device = "cuda"
        make_train_loader(ds, 6, 0, device="cpu")


def test_stream_workers_persist_across_epochs_and_follow_the_epoch(jpeg_dir, tmp_path):
    """One set of decoding workers serves every epoch (no fork per epoch or evaluation), and since each
    keeps its own copy of the dataset, the epoch travels with each request: epoch 1 from the persistent
    workers is epoch 1 of a fresh loader, not epoch 0 again."""
    ds = build_datasets(_cfg(jpeg_dir, tmp_path, augment=["rrc", "flip"])).train
    loader = make_train_loader(ds, 8, seed=3, num_workers=1)
    loader.set_epoch(0)
    first = [x for x, _ in loader]
    pids = [w.pid for w in loader._loader._iterator._workers]
    loader.set_epoch(1, start_step=1)
    second = [x for x, _ in loader]
    assert [w.pid for w in loader._loader._iterator._workers] == pids and all(
        w.is_alive() for w in loader._loader._iterator._workers
    )
    fresh = make_train_loader(ds, 8, seed=3, num_workers=0)
    fresh.set_epoch(1, start_step=1)
    assert len(second) == 3 and all(torch.equal(a, b) for a, b in zip(second, [x for x, _ in fresh]))
    assert not torch.equal(first[1], second[0])


def test_a_dead_builders_lock_is_taken_over_and_a_live_one_waited_for(jpeg_dir, tmp_path, monkeypatch):
    """The build lock of an entry (any host): a live one (its heartbeat moves) is waited for until its entry
    is ready; one whose time has not moved for STALE_S (of the waiter's clock) belongs to a dead builder and
    is taken over."""
    import threading

    from dml_dist.data import cache as C
    from dml_dist.data import cache_upkeep as U

    monkeypatch.setattr(U, "STALE_S", 2)
    monkeypatch.setattr(U, "HEARTBEAT_S", 0.2)
    files, cache, log = scan(str(jpeg_dir / "train")), str(tmp_path / "cache"), []
    entry = C.entry_path(cache, files, "train", "train/", 16, 1.0, files.key(16, 1.0))
    os.makedirs(cache)
    with open(f"{entry}.lock", "w") as f:
        f.write("otherhost:1\n")
    images, _ = cached_images(files, cache, "train", "train/", 16, 1.0, log.append)
    assert any("took over" in line and "a dead builder" in line for line in log) and "decoded 36" in log[-1]
    assert not os.path.exists(f"{entry}.lock")
    # A live builder: its lock is fresh, so this process waits, and uses the entry once it is ready.
    other = str(tmp_path / "other")
    entry = C.entry_path(other, files, "train", "train/", 16, 1.0, files.key(16, 1.0))
    os.makedirs(other)
    lock = U.BuildLock(entry, lambda: False, lambda s: None)
    assert lock.acquire()
    log.clear()
    done = threading.Event()
    waiter = threading.Thread(
        target=lambda: (cached_images(files, other, "train", "train/", 16, 1.0, log.append), done.set())
    )
    waiter.start()
    assert not done.wait(4) and any("waiting for the builder" in line for line in log)  # > STALE_S: not taken over
    assert not any("took over" in line for line in log)
    C.build_entry(entry, files, files.key(16, 1.0), 16, 1.0, lambda s: None)
    lock.release()
    waiter.join(30)
    assert done.is_set() and "built by another process meanwhile" in log[-1], log


def test_evaluation_batches_are_split_by_rows_and_positions_rebuild_the_set(tmp_path):
    """Every replica works on every evaluation batch (its rows of it); the positions each replica reports
    put the set back together, byte for byte, for 2 and 3 replicas and a short last batch."""
    from dml_dist.data.stream import StreamEvalLoader

    data = make_jpeg_folder(tmp_path / "data", classes=1, per_class=11)
    ds = FileImageDataset(scan(str(data / "train")), 16, 0.875)
    whole = torch.cat([x for x, _ in StreamEvalLoader(ds, "cpu", batch_size=4)])
    for replicas in (2, 3):
        rebuilt = torch.zeros_like(whole)
        for r in range(replicas):
            loader = StreamEvalLoader(ds, "cpu", batch_size=4, shard=(r, replicas), rows=(r, replicas))
            batches = list(loader)
            assert len(batches) >= 2 and len(loader.positions) == sum(len(y) for _, y in batches)
            rebuilt[loader.positions] = torch.cat([x for x, _ in batches])
        assert torch.equal(rebuilt, whole), replicas


def test_data_benchmark_counts_its_decodes_and_compares_rss_across_folders(tmp_path):
    """``dml-bench --data`` in a small form (docs/benchmarks.md): one cohort size, ``rss_dirs`` of two folders,
    the evaluation decode, the one-core comparison; the job, start-up and first-step runs are off
    (``job_steps=[]``, ``startup_files=0``, ``first_step=false``; the decode counts of larger cohorts are the
    probes' own, tested above). The counts are checked against the folders and the batch. The RSS figures are
    a smoke check that both folders were run and compared: at these sizes the peak is torch's own, so the
    documented target (flat within 10 % at 9,000 and 36,000 files) is the benchmark's to show at scale."""
    small = make_jpeg_folder(tmp_path / "small", per_class=6)
    large = make_jpeg_folder(tmp_path / "large", per_class=30, seed=1)
    out = tmp_path / "bench.jsonl"
    keys = {
        "data_dir": small,
        "image_size": 16,
        "batch_size": 4,
        "steps": 2,
        "cohorts": "[1]",
        "anchor_images": 8,
        "rss_dirs": f"[{small},{large}]",
        "first_step": "false",
        "job_steps": "[]",
        "startup_files": 0,
        "out": out,
    }
    r = run_cmd([sys.executable, "-m", "dml_dist.tools.bench", "--data", *(f"{k}={v}" for k, v in keys.items())])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text().splitlines()[-1])

    def n_train(n):  # val_fraction 0.1 held out of train/ (no val/ folder)
        return n - max(1, round(n * 0.1))

    assert list(res["decode"]) == ["1"] and res["decode"]["1"]["images_decoded_per_batch"] == 4, res["decode"]
    rss = res["rss"]
    assert [rss[str(d)]["files"] for d in (small, large)] == [n_train(18), n_train(90)], rss
    assert all(rss[str(d)]["rank_peak_rss_mb"] > 0 and rss[str(d)]["worker_peak_rss_mb"] > 0 for d in (small, large))
    assert "growth" in rss  # the comparison of the two, not asserted here (see above)
    ev = res["eval_decode"]
    assert ev["val_images"] == 2 and ev["first_start_images_decoded"] == 2 and ev["restart_images_decoded"] == 0, ev
    assert res["per_core"]["images"] == 8 and res["per_core"]["stream_images_per_s"] > 0
    assert res["job_cpu"] is None and res["startup"] is None and res["first_step"] is None
