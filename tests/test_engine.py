"""Issue 8 on CPU: torch.compile trains like eager, a non-finite loss stops the run with one line naming
the epoch and steps, no host sync in a step (meters on the device)."""

import re
import sys

import pytest
import torch
from conftest import (
    assert_no_worker_traceback,
    base_args,
    error_lines,
    make_image_folder,
    read_summary,
    run_cmd,
    torchrun,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("engine") / "data", n_train=16, n_val=4)


def test_compile_applies_under_torchrun_and_trains_close_to_eager(tmp_path, tiny):
    """A real torchrun run with compile: reduce-overhead, which on CPU compiles in the default mode and says
    why: rank 0 logs dynamo's counters after the first epoch, which prove the peer ran compiled graphs, and so did
    the step's work around the model (the augmentation with the normalisation, the loss with the meters); the
    losses stay close to an eager run's. One peer: two ranks compiling at once take minutes on 2 cores, and
    the gather of logits is the same for any module."""
    out = {}
    for name, extra in (("eager", {}), ("compiled", {"compile": "reduce-overhead"})):
        # wrn10_1: one block per stage, a third of ResNet-20's compile (CI starts with an empty inductor cache)
        keys = {"epochs": 1, "augment": "[crop,flip,rotate,jitter]", "model_num": 1, "model": "wrn10_1", **extra}
        args = base_args(tmp_path / name, tiny, **keys)  # the eager reference as one plain process (no launcher)
        r = torchrun(1, args) if name == "compiled" else run_cmd([sys.executable, "-m", "dml_dist.train", *args])
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = (r.stdout, read_summary(tmp_path / name))
    line = re.search(
        r"compile: (\w+), (\d+) graph\(s\) compiled, (\d+) graph break\(s\) in the first epoch; "
        r"of them batch transform (\d+), loss and meters (\d+)",
        out["compiled"][0],
    )
    assert line and line.group(1) == "OptimizedModule", out["compiled"][0][-3000:]
    graphs, breaks, transform, score = (int(line.group(k)) for k in (2, 3, 4, 5))
    # each part compiled, and not once per step (dynamo's recompile limit, 8, would then make it eager silently)
    assert 1 <= transform <= 2 and 1 <= score <= 2 and graphs >= transform + score + 1, line.group(0)  # + the model
    assert breaks == 0, line.group(0)
    assert "compile:" not in out["eager"][0]
    (_, eager), (_, compiled) = out["eager"], out["compiled"]
    assert compiled["config"]["compile"] == "reduce-overhead" and eager["config"]["compile"] is False
    assert compiled["resolved"]["compile"] == ["default"] and eager["resolved"]["compile"] == [None]
    assert (
        "compile: peer 1: reduce-overhead: CUDA graphs need a CUDA device; mode default instead" in out["compiled"][0]
    )
    a, b = eager["history"][0], compiled["history"][0]
    # close (on CPU they agree to about 1e-7; a wrong graph is off by far more) ...
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    # ... and the checkpoints hold the plain modules' weights (no torch.compile prefix)
    w = torch.load(tmp_path / "compiled" / "ckpt" / "t_model1_final.pth", weights_only=True)["model"]
    assert w and not any(k.startswith("_orig_mod") for k in w)


def test_non_finite_loss_is_one_line_naming_epoch_and_steps(tmp_path, tiny):
    r = torchrun(2, base_args(tmp_path, tiny, lr=1e12, epochs=2, print_freq=4))
    assert r.returncode != 0
    errs = error_lines(r.stderr)
    assert len(errs) == 1, r.stderr[-3000:]
    # read at the first print_freq boundary: steps 0-3 of epoch 1, for both peers
    assert "peer(s) [1, 2]: loss is not finite (nan/inf) at epoch 1, steps 0-3; lower lr" in errs[0], errs[0]
    assert_no_worker_traceback(r.stderr)
    assert not (tmp_path / "ckpt" / "t_latest.pth").exists()  # nothing diverged was saved


def test_non_finite_weights_are_never_saved(tmp_path, tiny):
    """Peer 2's weights turn nan at the end of epoch 2 while its loss stayed finite (DML_FAULT nan_weights):
    the save refuses them with one line, and every file on disk still holds epoch 1's finite weights."""
    r = torchrun(2, base_args(tmp_path, tiny, epochs=3), env={"DML_FAULT": "action=nan_weights,rank=1,epoch=2"})
    assert r.returncode != 0
    errs = error_lines(r.stderr)
    assert len(errs) == 1, r.stderr[-3000:]
    assert "peer(s) [2]: weights are not finite (nan/inf) at epoch 2; lower lr" in errs[0], errs[0]
    assert_no_worker_traceback(r.stderr)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == sorted(["t_latest.pth"] + [f"t_model{k}_{t}.pth" for k in (1, 2) for t in ("best", "epoch_1")])
    latest = torch.load(tmp_path / "ckpt" / "t_latest.pth", weights_only=True)
    assert latest["epoch"] == 1
    for f in files:
        ck = torch.load(tmp_path / "ckpt" / f, weights_only=True)
        for state in [p["model"] for p in ck["peers"]] if "peers" in ck else [ck["model"]]:
            assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), f


def test_the_ensemble_is_the_mean_of_the_peers_softmaxes():
    """Issue 25: computed by hand. Peer 1 [5, 4, -100], peer 2 [0, 1.2, 0]: the mean of their softmaxes picks
    class 0, the softmax of their mean logits would pick class 1 (and give another loss)."""
    import math

    from dml_dist.engine import score_logits

    logits = torch.tensor([[[5.0, 4.0, -100.0]], [[0.0, 1.2, 0.0]]])
    p1 = [math.exp(5) / (math.exp(5) + math.exp(4)), math.exp(4) / (math.exp(5) + math.exp(4)), 0.0]
    z2 = 2 + math.exp(1.2)
    p2 = [1 / z2, math.exp(1.2) / z2, 1 / z2]
    mean = [(a + b) / 2 for a, b in zip(p1, p2)]
    assert max(range(3), key=mean.__getitem__) == 0 and int(logits.mean(0).argmax()) == 1
    s = score_logits(logits, torch.tensor([0]))
    assert s["ensemble_correct"] == 1 and s["ensemble_acc"] == 1.0
    assert s["ensemble_loss"] == pytest.approx(-math.log(mean[0]), rel=1e-6)
    assert s["peer_correct"] == [1, 0]


def test_the_batch_fingerprint_sees_the_images_the_labels_and_the_parameters_apart():
    """Issue 25: a fingerprint that hashed the labels twice (or ignored the images) passed the suite. Each
    of the three must change its own hash and leave the other alone."""
    from dml_dist.data.augment import AugParams
    from dml_dist.data.fingerprint import batch_fingerprint

    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g)
    y, params = torch.tensor([0, 1, 2, 3]), AugParams.draw(4, torch.Generator().manual_seed(1))
    x = u8.float()
    base = batch_fingerprint(x, y, (u8, params)).tolist()
    pixel = u8.clone()
    pixel[2, 1, 3, 4] ^= 1
    one_bit = batch_fingerprint(x, y, (pixel, params)).tolist()
    assert one_bit[0] == base[0] and one_bit[1] != base[1]  # one bit of one image: the inputs' hash only
    labels = y.clone()
    labels[0] = 9
    changed = batch_fingerprint(x, labels, (u8, params)).tolist()
    assert changed[0] != base[0] and changed[1] == base[1]  # the labels' hash only
    flipped = AugParams(**{**params.__dict__, "flip": ~params.flip})
    assert batch_fingerprint(x, y, (u8, flipped))[1] != base[1]  # the augmentation parameters count too
    x2 = x.clone()
    x2[0, 0, 0, 0] += 1  # the per-sample path: the float inputs themselves
    assert batch_fingerprint(x2, y)[1] != batch_fingerprint(x, y)[1]
    assert batch_fingerprint(x2, y)[0] == batch_fingerprint(x, y)[0]


def test_a_print_boundary_is_logged_after_the_next_step_with_the_meters_it_had():
    """Issue 22: the line of a ``print_freq`` boundary is read from a snapshot once the next step is queued (on a GPU
    the host waits for that step's work only). On the CPU: the line of step 2 of 3 comes after the third batch was
    drawn, and holds the meters of the first two steps, the same as an epoch of just those two batches (read at once,
    at its end). Red with the boundary read at once, or with the line read from the live meters one step later."""
    from dml_dist.distributed import DistContext
    from dml_dist.distributed.placement import Placement
    from dml_dist.engine import Peer, train_one_epoch
    from dml_dist.logger import NullLogger
    from dml_dist.models import build_model

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
    ctx = DistContext(0, 1, 0, 1, Placement("cpu", "gloo", 1, False))
    cfg = {"kl_weight": 1.0, "kl_warmup_epochs": 0, "temperature": 1.0, "mutual": "dml", "mutual_weights": None,
           "print_freq": 2, "consistency_check_every": 0, "batch_size": 4}  # fmt: skip

    def epoch(n: int) -> list[str]:
        events = []

        class Log(NullLogger):
            def info(self, msg):
                events.append(msg)

        class Loader:
            def __len__(self):
                return n

            def __iter__(self):
                for k in range(n):
                    events.append(f"batch {k}")
                    yield batches[k]

        torch.manual_seed(0)
        model = build_model("resnet20", 3, image_size=16)
        peer = Peer(model, torch.optim.SGD(model.parameters(), lr=0.1))
        train_one_epoch(peer, Loader(), ctx, cfg, "all_gather", 1, logger=Log())
        return events

    three, two = epoch(3), epoch(2)
    assert [e.split(" eta")[0] for e in three] == ["batch 0", "batch 1", "batch 2", "epoch 1 [2/3]", "epoch 1 [3/3]"]
    loss_acc = [re.search(r"loss/acc (\S+ \S+)", e).group(1) for e in (three[3], two[2])]
    assert loss_acc[0] == loss_acc[1], loss_acc
