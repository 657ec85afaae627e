import pickle

import numpy as np
import pytest
import torch
from conftest import make_image_folder

from dml_dist import DMLError, create_dml_config
from dml_dist.data import SeededDataset, SharedSeedBatchSampler, build_datasets, load_image_folder, sample_dataloader


def _cfg(data_dir, **kw):
    return create_dml_config(data_dir=str(data_dir), image_size=16, **kw)


def test_image_folder_layout_and_val_split(tmp_path):
    d = make_image_folder(tmp_path / "d", n_train=10, n_val=4)
    data = build_datasets(_cfg(d))
    assert data.classes == ["cat", "dog", "frog"] and len(data.train) == 30 and len(data.val) == 12
    assert data.test is None
    x, y = data.val[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0
    # no val/: deterministic val_fraction split of train/
    d2 = make_image_folder(tmp_path / "d2", n_train=10, splits=("train",))
    a, b = build_datasets(_cfg(d2, val_fraction=0.2)), build_datasets(_cfg(d2, val_fraction=0.2))
    assert len(a.val) == 6 and len(a.train) == 24
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)


def test_test_split_is_loaded_and_resized(tmp_path):
    d = make_image_folder(tmp_path / "d", n_train=4, n_val=2, size=20, splits=("train", "val", "test"))
    data = build_datasets(_cfg(d))
    assert len(data.test) == 6 and data.train.images.shape[-2:] == (16, 16)


def test_sampler_is_identical_for_same_seed_and_resumes_mid_epoch():
    s1, s2 = SharedSeedBatchSampler(50, 8, seed=3), SharedSeedBatchSampler(50, 8, seed=3)
    s1.set_epoch(2)
    s2.set_epoch(2)
    full = list(s1)
    assert full == list(s2) and len(full) == 6
    s2.set_epoch(2, start_step=4)
    assert list(s2) == full[4:]
    s2.set_epoch(3)
    assert list(s2) != full
    assert list(SharedSeedBatchSampler(50, 8, seed=4)) != list(SharedSeedBatchSampler(50, 8, seed=3))


def test_per_sample_path_is_byte_identical_across_worker_counts(tmp_path):
    ds = load_image_folder(
        str(make_image_folder(tmp_path / "d", n_train=12, splits=("train",)) / "train"), 16, augment=True
    )

    def batches(workers):
        loader = sample_dataloader(ds, 8, seed=7, num_workers=workers)
        loader.batch_sampler.set_epoch(1)
        return [(x.clone(), y.clone()) for x, y in loader]

    b0, b2 = batches(0), batches(2)
    assert len(b0) == 4 and all(torch.equal(x0, x2) and torch.equal(y0, y2) for (x0, y0), (x2, y2) in zip(b0, b2))
    plain = torch.stack([ds[i][0] for i, _ in next(iter(SharedSeedBatchSampler(len(ds), 8, 7)))])
    assert not torch.equal(plain, b0[0][0])  # augmentation really changed the inputs


def test_train_subset_is_deterministic_by_seed(tmp_path):
    d = make_image_folder(tmp_path / "d", n_train=10, n_val=2)
    a = build_datasets(_cfg(d, train_subset=7))
    b = build_datasets(_cfg(d, train_subset=7))
    c = build_datasets(_cfg(d, train_subset=7, seed=1))
    assert len(a.train) == 7 and len(a.val) == 6
    assert torch.equal(a.train.images, b.train.images) and not torch.equal(a.train.images, c.train.images)
    assert len(build_datasets(_cfg(d, train_subset=1000)).train) == 30


def test_seeded_dataset_makes_user_transforms_deterministic():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.rand(3) + i, i % 2

    ds = SeededDataset(Noisy())
    assert torch.equal(ds[(3, 99)][0], ds[(3, 99)][0])
    assert not torch.equal(ds[(3, 99)][0], ds[(3, 100)][0])


@pytest.mark.parametrize(
    "breakage,match",
    [
        ("missing", "does not exist"),
        ("empty_class", "class folder .*dog holds no images"),
        ("unreadable", r"cannot read image .*0001\.png"),
        ("mismatch", r"class folders of train/ and val/ differ \(only in train: \['frog'\]"),
    ],
)
def test_bad_folders_raise_clear_errors(tmp_path, breakage, match):
    d = make_image_folder(tmp_path / "d", n_train=4, n_val=2)
    if breakage == "missing":
        d = tmp_path / "nope"
    elif breakage == "empty_class":
        for f in (d / "train" / "dog").iterdir():
            f.unlink()
    elif breakage == "unreadable":
        (d / "train" / "cat" / "0001.png").write_bytes(b"not a png")
    elif breakage == "mismatch":
        for f in (d / "val" / "frog").iterdir():
            f.unlink()
        (d / "val" / "frog").rmdir()
    with pytest.raises(DMLError, match=match):
        build_datasets(_cfg(d))


def write_tiny_cifar10(root, n_train=20, n_test=10, seed=0, label=None):
    """A few images in the CIFAR-10 python format (the layout torchvision downloads); ``label``: give every
    image this class instead of random ones."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    for i in range(1, 6):
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump(
                {
                    "data": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8),
                    "labels": [int(v) if label is None else label for v in rng.integers(0, 10, n_train)],
                },
                f,
            )
    with open(base / "test_batch", "wb") as f:
        pickle.dump(
            {
                "data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                "labels": [int(v) if label is None else label for v in rng.integers(0, 10, n_test)],
            },
            f,
        )
    return root


def test_cifar10_python_format(tmp_path):
    write_tiny_cifar10(tmp_path)
    data = build_datasets(
        create_dml_config(dataset="cifar10", data_dir=str(tmp_path), val_fraction=0.1, download=False)
    )
    assert len(data.train) == 90 and len(data.val) == 10 and len(data.test) == 10
    assert data.num_classes == 10 and data.classes[0] == "airplane"
    assert data.train[0][0].shape == (3, 32, 32)
    with pytest.raises(DMLError, match="cifar100 not found"):
        build_datasets(create_dml_config(dataset="cifar100", data_dir=str(tmp_path), download=False))
