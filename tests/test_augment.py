"""The device data path on CPU tensors: batched augmentation against its per-sample reference, batches that
depend on (seed, epoch, step) alone, exact mid-epoch resume, replica shards."""

import pytest
import torch

from dml_dist.data import DeviceEvalLoader, DeviceTrainLoader, TensorImageDataset, normalize
from dml_dist.data.augment import AUGMENTATIONS, AugParams, augment_batch, augment_one, step_generator


def _dataset(n=40, size=16, augment=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return TensorImageDataset(images, torch.arange(n) % 3, ["a", "b", "c"], augment)


@pytest.mark.parametrize(
    "ops,tol", [(["crop"], 0.0), (["flip"], 0.0), (["rotate"], 1e-5), (["jitter"], 1e-5), (list(AUGMENTATIONS), 1e-5)]
)
def test_batched_augmentation_matches_per_sample_reference(ops, tol):
    x = _dataset(32, 24).images
    p = AugParams.draw(32, step_generator(3, 1, 4))
    batch = augment_batch(x, p, ops)
    ref = torch.stack([augment_one(x[k], p[k], ops) for k in range(32)])
    assert batch.dtype == torch.float32 and batch.shape == ref.shape
    assert (batch - ref).abs().max().item() <= tol
    assert not torch.equal(batch, x.float() / 255)  # the augmentation did something


def test_each_augmentation_does_what_its_name_says():
    x = _dataset(8, 16).images
    p = AugParams.draw(8, step_generator(0, 0, 0))
    p.crop_i[:], p.crop_j[:], p.flip[:] = 4, 4, True
    flipped = augment_batch(x, p, ["crop", "flip"])  # centre crop = identity, then a mirror image
    assert torch.equal(flipped, x.flip(-1).float() / 255)
    p.crop_i[:], p.crop_j[:] = 0, 8  # shifted down 4 and left 4: zero padding enters top rows, right columns
    shifted = augment_batch(x, p, ["crop"])
    assert shifted[:, :, :4].abs().sum() == 0 and shifted[:, :, :, -4:].abs().sum() == 0
    assert torch.equal(shifted[:, :, 4:, :-4], x[:, :, :-4, 4:].float() / 255)


def test_parameters_depend_on_seed_epoch_step_alone():
    a = AugParams.draw(16, step_generator(1, 2, 3))
    b = AugParams.draw(16, step_generator(1, 2, 3))
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("crop_i", "angle", "saturation"))
    for other in ((1, 2, 4), (1, 3, 3), (2, 2, 3)):
        assert not torch.equal(a.angle, AugParams.draw(16, step_generator(*other)).angle)
    assert set(a.crop_i.tolist()) <= set(range(9)) and a.angle.abs().max() <= 10


def _epoch(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_two_ranks_draw_byte_identical_batches_and_resume_mid_epoch():
    ds = _dataset()
    rank0, rank1 = (DeviceTrainLoader(ds, 8, seed=5, device=torch.device("cpu")) for _ in range(2))
    e0, e1 = _epoch(rank0, 1), _epoch(rank1, 1)
    assert len(e0) == 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e0, e1))
    # exact mid-epoch resume: a fresh loader positioned at step 3 gives steps 3.. of the same epoch
    resumed = _epoch(DeviceTrainLoader(ds, 8, seed=5, device=torch.device("cpu")), 1, start=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, e0[3:])) and len(resumed) == 2
    # each epoch is a permutation of the whole set; another epoch or seed gives other batches
    labels = torch.cat([y for _, y in e0])
    assert sorted(labels.tolist()) == sorted(ds.labels[torch.cat([rank0.plan(1, s)[0] for s in range(5)])].tolist())
    assert not torch.equal(_epoch(rank0, 2)[0][0], e0[0][0])
    assert not torch.equal(_epoch(DeviceTrainLoader(ds, 8, seed=6, device=torch.device("cpu")), 1)[0][0], e0[0][0])


def test_device_batch_equals_per_sample_reference_of_the_same_plan():
    ds = _dataset()
    loader = DeviceTrainLoader(ds, 8, seed=5, device=torch.device("cpu"))
    idx, params = loader.plan(2, 1)
    x, y = loader.batch(2, 1)
    ref = torch.stack([normalize(augment_one(ds.images[i], params[k], AUGMENTATIONS)) for k, i in enumerate(idx)])
    assert (x - ref).abs().max() < 1e-4 and torch.equal(y, ds.labels[idx])


def test_replica_shards_partition_the_batch():
    ds = _dataset()
    full = DeviceTrainLoader(ds, 8, seed=5, device=torch.device("cpu"))
    shards = [DeviceTrainLoader(ds, 8, seed=5, device=torch.device("cpu"), shard=(r, 2)) for r in range(2)]
    x, y = full.batch(0, 2)
    parts = [s.batch(0, 2) for s in shards]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


def test_augmentation_subset_and_off():
    ds = _dataset(augment=["crop", "flip"])
    x, _ = DeviceTrainLoader(ds, 8, seed=1, device=torch.device("cpu")).batch(0, 0)
    # crop+flip only move pixels: every value is a normalised original byte (or zero padding)
    raw = set(normalize(ds.images).flatten().tolist()) | set(
        normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8)).flatten().tolist()
    )
    assert set(x.flatten().tolist()) <= raw
    plain = DeviceTrainLoader(_dataset(augment=False), 8, seed=1, device=torch.device("cpu"))
    idx, _ = plain.plan(0, 0)
    assert torch.equal(plain.batch(0, 0)[0], normalize(ds.images[idx]))


def test_eval_loader_covers_the_set_in_order_and_in_shards():
    ds = _dataset(n=21)
    whole = list(DeviceEvalLoader(ds, torch.device("cpu"), batch_size=8))
    assert [len(y) for _, y in whole] == [8, 8, 5]
    assert torch.equal(torch.cat([x for x, _ in whole]), normalize(ds.images))
    parts = [torch.cat([y for _, y in DeviceEvalLoader(ds, torch.device("cpu"), 8, shard=(r, 2))]) for r in range(2)]
    assert torch.equal(torch.cat(parts), ds.labels)


def test_jitter_builds_its_greyscale_weights_once_per_device():
    """Issue 16: the weights were built from a Python list on every call (two blocking host-to-device
    copies per step on a GPU); now once per (device, dtype)."""
    from dml_dist.data.augment import AugParams, _gray_weights, augment_batch, step_generator

    _gray_weights.cache_clear()
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    for step in range(3):
        augment_batch(x, AugParams.draw(4, step_generator(0, 0, step)), ["jitter"])
    info = _gray_weights.cache_info()
    assert info.misses == 1 and info.hits == 5  # contrast and saturation, 3 steps


def test_fingerprint_hashes_the_uint8_batch_and_its_parameters_not_the_float_inputs():
    """Issue 16: the check copied the whole float batch to the host (300 MB at batch 512, 224 px); it now
    hashes what defines the batch: the uint8 images before augmentation and the augmentation parameters."""
    from dml_dist.data.fingerprint import batch_fingerprint

    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = TensorImageDataset(images, torch.arange(20) % 2, ["a", "b"], ["crop", "flip"])
    loader = DeviceTrainLoader(ds, 4, seed=0, device="cpu")
    x, y = loader.batch(0, 1)
    u8, params = loader.last_source
    assert u8.dtype == torch.uint8 and u8.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    fp = batch_fingerprint(x, y, loader.last_source)
    assert torch.equal(fp, batch_fingerprint(*loader.batch(0, 1), loader.last_source))  # same step, same hash
    other = params[torch.arange(4)]
    other.flip = ~other.flip  # same images, other augmentation: caught
    assert not torch.equal(fp, batch_fingerprint(x, y, (u8, other)))
    assert not torch.equal(fp, batch_fingerprint(*loader.batch(0, 2), loader.last_source))


@pytest.mark.parametrize("ops", [["crop", "flip"], ["crop", "flip", "rotate", "jitter"], []])
def test_a_step_sends_one_host_to_device_copy(ops):
    """Issue 16: a step copied 8 small tensors to the device (the indices and every AugParams field, used
    or not). Now one packed tensor of the fields the active ops use. Counted on CPU with a torch function
    mode that sees every Tensor.to(device) of a step (each one is a host-to-device copy on a GPU)."""
    from torch.overrides import TorchFunctionMode

    class CountTo(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to and any(isinstance(a, (torch.device, str)) for a in args[1:]):
                self.calls += 1
            return func(*args, **(kwargs or {}))

    ds = _dataset(augment=ops)
    loader = DeviceTrainLoader(ds, 8, seed=0, device="cpu")
    reference = [loader.batch(1, s) for s in range(3)]
    with CountTo() as counter:
        batches = [loader.batch(1, s) for s in range(3)]
    assert counter.calls == 3 and loader.upload.copies == 6
    assert loader.upload.names == [
        n
        for op in ops
        for n in {
            "crop": ["crop_i", "crop_j"],
            "flip": ["flip"],
            "rotate": ["angle"],
            "jitter": ["brightness", "contrast", "saturation"],
        }[op]
    ]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(reference, batches))
