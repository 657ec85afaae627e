import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CI

from dml_dist import DMLError, build_model, compute_dml_loss
from dml_dist.models import count_parameters

# He et al. 2016, Table 6 (10 classes), as the paper rounds them: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M.
PAPER = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85}


@pytest.mark.parametrize("name,expected", PAPER.items())
def test_parameter_counts(name, expected):
    n = count_parameters(build_model(name, 10))
    assert round(n / 1e6, 2) == expected, n


def _readme_counts() -> list[tuple[str, int, int]]:
    """(name, params with 10 classes, with 100) for every model the Models table (docs/configuration.md) counts."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    table = readme.split("| name | what | params, 10 classes | params, 100 classes |", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = [n for n in re.findall(r"`([^`]+)`", cells[0]) if "<" not in n]
        c10, c100 = ([int(x.replace(",", "")) for x in re.findall(r"\d[\d,]{4,}", c)] for c in cells[2:4])
        assert len(names) == len(c10) == len(c100), line
        rows += zip(names, c10, c100)
    return rows


README_COUNTS = _readme_counts()


def test_readme_table_lists_every_family():
    assert len(README_COUNTS) == 13
    assert {n for n, _, _ in README_COUNTS} >= {
        "resnet110", "wrn28_10", "mobilenetv2", "torchvision.resnet18", "timm.resnet18"
    }  # fmt: skip


@pytest.mark.parametrize("name,n10,n100", README_COUNTS, ids=[r[0] for r in README_COUNTS])
def test_readme_parameter_counts_are_exact(name, n10, n100):
    if name.startswith("timm.") and importlib.util.find_spec("timm") is None:
        if CI:
            pytest.fail("CI=true and timm is not installed: install the test extras")
        pytest.skip("timm is not installed (pip install 'dml-dist[timm]')")
    size = 64 if name.startswith("torchvision.") else 32
    assert count_parameters(build_model(name, 10, image_size=size)) == n10
    assert count_parameters(build_model(name, 100, image_size=size)) == n100


def test_resnet110_parameter_count():
    n = count_parameters(build_model("resnet110", 10))
    assert round(n / 1e6, 1) == 1.7 and n == 1_727_962


def test_registry_is_case_insensitive_and_lists_valid_names():
    assert build_model("ResNet32", 100).fc.out_features == 100
    with pytest.raises(DMLError, match="resnet20, resnet32, resnet44, resnet56, resnet110, wrn<depth>_<width>"):
        build_model("resnet18", 10)


def test_forward_shape_for_other_image_sizes():
    m = build_model("resnet20", 7).eval()
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def _hand_kl(p_j, p_i):  # KL(p_j || p_i) summed over classes, averaged over the batch
    return (p_j * (p_j.log() - p_i.log())).sum(-1).mean()


def test_dml_loss_against_hand_computation():
    torch.manual_seed(0)
    z = torch.randn(5, 4, requires_grad=True)
    peers = torch.randn(2, 5, 4)
    y = torch.randint(0, 4, (5,))
    T = 3.0
    out = compute_dml_loss(z, peers, y, temperature=T)
    p_i = torch.softmax(z / T, -1)
    kl = (_hand_kl(torch.softmax(peers[0] / T, -1), p_i) + _hand_kl(torch.softmax(peers[1] / T, -1), p_i)) / 2
    assert torch.allclose(out.ce, F.cross_entropy(z, y))
    assert torch.allclose(out.kl, kl * T * T, atol=1e-6)
    assert torch.allclose(out.total, out.ce + out.kl)
    # direction: KL(p_j || p_i), not KL(p_i || p_j)
    wrong = (_hand_kl(p_i, torch.softmax(peers[0] / T, -1)) + _hand_kl(p_i, torch.softmax(peers[1] / T, -1))) / 2
    assert not torch.allclose(out.kl, wrong * T * T, atol=1e-4)


def test_peers_are_detached_and_kl_weight_scales():
    z = torch.randn(3, 4, requires_grad=True)
    peer = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    out = compute_dml_loss(z, [peer], y, kl_weight=0.5)
    out.total.backward()
    assert peer.grad is None and z.grad is not None
    assert torch.allclose(out.total, out.ce + 0.5 * out.kl)
    assert compute_dml_loss(z, [peer], y, kl_weight=0.0).total.item() == pytest.approx(out.ce.item())


def test_single_peer_is_plain_cross_entropy():
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    for empty in ([], torch.empty(0, 4, 3)):
        out = compute_dml_loss(z, empty, y, temperature=4.0)
        assert out.kl.item() == 0 and torch.allclose(out.total, F.cross_entropy(z, y))


def test_identical_predictions_give_zero_kl():
    z = torch.randn(4, 3)
    assert compute_dml_loss(z, [z.clone(), z.clone()], torch.zeros(4, dtype=torch.long)).kl.abs().item() < 1e-6


# Issue 11: the paper's mixed cohorts. Counts with 100 classes (CIFAR-100). WRN-28-10 (the paper's 36.5M:
# 36,536,884) is counted by the models table's test above; building it a third time adds nothing but seconds.
COUNTS_100 = {
    "wrn16_4": 2_772_020,
    "wrn28_2": 1_479_220,
    "mobilenet": 3_309_476,
    "mobilenetv2": 2_351_972,
    "resnet32": 470_004,
}


@pytest.mark.parametrize("name,expected", COUNTS_100.items())
def test_mixed_cohort_parameter_counts_with_100_classes(name, expected):
    model = build_model(name, 100)
    assert count_parameters(model) == expected
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_names_are_case_insensitive_for_every_family():
    from dml_dist.models import canonical_model_name

    assert canonical_model_name("WRN-28-10") == canonical_model_name("wrn28_10") == "wrn28_10"
    assert canonical_model_name("MobileNetV2") == "mobilenetv2" and canonical_model_name("MobileNet") == "mobilenet"
    assert canonical_model_name("torchvision.ResNet18") == "torchvision.resnet18"
    for bad, needle in (
        ("wrn27_2", "6n\\+4"),
        ("torchvision.nope", "torchvision has no classification model"),
        ("vgg", "unknown model 'vgg'"),
    ):
        with pytest.raises(DMLError, match=needle):
            build_model(bad, 10)


def test_torchvision_models_need_64_pixels_and_take_num_classes():
    m = build_model("torchvision.resnet18", 7, image_size=64)
    assert m.fc.out_features == 7 and m.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(DMLError, match="at least 64x64 .*image_size=32"):
        build_model("torchvision.resnet18", 7, image_size=32)
    with pytest.raises(DMLError, match="pretrained weights exist only for torchvision"):
        build_model("resnet20", 7, pretrained=True)


def test_pretrained_weights_come_from_torchvision_cache(tmp_path, monkeypatch):
    import torchvision

    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), cache / weights.url.rsplit("/", 1)[1])  # stands in for the download
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    m = build_model("torchvision.resnet18", 5, image_size=64, pretrained=True)
    assert torch.equal(m.conv1.weight, reference.conv1.weight) and m.fc.out_features == 5
    # Neither in the cache nor downloadable (the cache is a file, not a folder): one clear error.
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    monkeypatch.setenv("TORCH_HOME", str(blocked))
    with pytest.raises(DMLError, match="not in torchvision's cache .* could not be downloaded"):
        build_model("torchvision.resnet18", 5, image_size=64, pretrained=True)


def test_ensemble_variant_against_hand_computation():
    torch.manual_seed(1)
    z, peers, y, T = torch.randn(4, 5), torch.randn(3, 4, 5), torch.randint(0, 5, (4,)), 2.0
    out = compute_dml_loss(z, peers, y, temperature=T, kl_weight=0.5, mutual="ensemble")
    q = torch.softmax(peers / T, -1).mean(0)  # the mean of the other peers' softened probabilities
    kl = (q * (q.log() - torch.log_softmax(z / T, -1))).sum(-1).mean() * T * T
    assert torch.allclose(out.kl, kl, atol=1e-6) and torch.allclose(out.total, out.ce + 0.5 * kl, atol=1e-6)
    # with one peer the two variants agree; with several they differ
    one = peers[:1]
    assert torch.allclose(compute_dml_loss(z, one, y, mutual="ensemble").kl, compute_dml_loss(z, one, y).kl, atol=1e-6)
    assert not torch.allclose(out.kl, compute_dml_loss(z, peers, y, temperature=T).kl, atol=1e-4)


def test_original_call_form_of_compute_dml_loss():
    torch.manual_seed(0)
    models = [build_model("resnet20", 4).eval() for _ in range(3)]
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 3])
    loss = compute_dml_loss(models, x, y, 1)
    assert loss.dim() == 0 and loss.requires_grad
    z = [m(x) for m in models]
    expected = compute_dml_loss(z[1], [z[0].detach(), z[2].detach()], y).total
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert models[0].fc.weight.grad is None and models[1].fc.weight.grad is not None  # peers ran under no_grad
    t = compute_dml_loss(models, x, y, 0, temperature=3.0, kl_weight=0.0)
    assert torch.allclose(t, F.cross_entropy(models[0](x), y), atol=1e-6)


def test_kl_warmup_ramp_against_hand_values():
    from dml_dist.loss import kl_ramp

    # 2 warm-up epochs of 10 steps, kl_weight 0.5: 0 at the first step, 0.5 * 15/20 at epoch 2 step 5, then 0.5
    assert kl_ramp(0.5, 2, 10, epoch=1, step=0) == 0.0
    assert kl_ramp(0.5, 2, 10, epoch=1, step=4) == pytest.approx(0.5 * 4 / 20)
    assert kl_ramp(0.5, 2, 10, epoch=2, step=5) == pytest.approx(0.5 * 15 / 20)
    assert kl_ramp(0.5, 2, 10, epoch=3, step=0) == 0.5 and kl_ramp(0.5, 2, 10, epoch=7, step=3) == 0.5
    assert kl_ramp(0.5, 0, 10, epoch=1, step=0) == 0.5  # no warm-up


def test_channels_last_auto_is_on_for_convolutional_peers_under_amp_on_cuda_only():
    """The rule is decided on the model and the device objects, so it is checked here without a GPU."""
    import torch.nn as nn

    from dml_dist.models import build_model, channels_last_choice

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    resnet = build_model("resnet20", 10, image_size=32)
    vit_like = nn.Sequential(nn.Conv2d(3, 64, 16, 16), nn.Flatten(), nn.Linear(256, 4096), nn.Linear(4096, 10))
    assert channels_last_choice("auto", resnet, cuda, "bf16")[0] is True
    assert channels_last_choice("auto", resnet, cuda, "off") == (False, "auto: off without AMP")
    assert channels_last_choice("auto", vit_like, cuda, "bf16") == (False, "auto: off, not a convolutional model")
    assert channels_last_choice(True, vit_like, cuda, "off")[0] is True  # asked for: as asked
    assert channels_last_choice(True, resnet, cpu, "bf16") == (False, "off on CPU")  # CPU results never change


def test_compile_reduce_overhead_only_where_cuda_graphs_can_run():
    """CUDA graphs need a CUDA device and a peer without DDP; elsewhere the peer compiles in the same mode without
    them (reduce-overhead: the default mode), and the reason is what the log prints."""
    from dml_dist.parallel import compile_choice

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert compile_choice(False, cuda, 1) == (None, "off")
    assert compile_choice(True, cpu, 2) == ("default", "compile=default")
    assert compile_choice("reduce-overhead", cuda, 1) == ("reduce-overhead", "compile=reduce-overhead: CUDA graphs")
    assert compile_choice("reduce-overhead", cuda, 2) == (
        "default",
        "reduce-overhead: CUDA graphs are not used over DDP (2 replicas); mode default instead",
    )
    assert compile_choice("reduce-overhead", cpu, 1)[0] == "default"
    # max-autotune replays CUDA graphs too: where they cannot run, the same autotuning without them
    assert compile_choice("max-autotune", cuda, 1) == ("max-autotune", "compile=max-autotune: CUDA graphs")
    assert compile_choice("max-autotune", cuda, 2)[0] == "max-autotune-no-cudagraphs"
    assert compile_choice("max-autotune", cpu, 1)[0] == "max-autotune-no-cudagraphs"


def test_compile_report_counts_cuda_graph_skips_since_the_run_began_and_only_with_cuda_graphs():
    """The report's figures are this run's (counters since ``before``), and the CUDA-graph skips appear only for a mode
    that asked for CUDA graphs (a CPU run never reaches that branch: its modes fall back)."""
    from torch._dynamo.utils import counters

    from dml_dist.parallel import compile_report, dynamo_counts

    counters["inductor"]["cudagraph_skips"] += 3  # a caller's earlier compile
    before = dynamo_counts()
    counters["stats"]["unique_graphs"] += 1
    counters["inductor"]["cudagraph_skips"] += 2
    try:
        line = compile_report(torch.nn.Linear(1, 1), before, "max-autotune")
        assert line == "compile: Linear, 1 graph(s) compiled, 0 graph break(s) in the first epoch, 2 CUDA-graph skip(s)"
        assert compile_report(torch.nn.Linear(1, 1), before, "default").endswith("graph break(s) in the first epoch")
    finally:
        counters["stats"]["unique_graphs"] -= 1
        counters["inductor"]["cudagraph_skips"] -= 5


def test_the_compiled_loss_with_meters_matches_eager_and_compiles_once_per_input_kind():
    """``compile``: the DML loss with the meters' statistics (``score_step``) compiled as the trainer does
    (``CompiledPart``) gives eager's loss, statistics and gradient, through the all-gather's tensor (3 peers,
    ``mutual_weights``) and the all-reduce's ``PeerSums`` (about 10 CPU-s of compiling each), while the warm-up's
    KL weight changes every step: at most 2 graphs per kind (the first weight, then one graph for any weight),
    never dynamo's recompile limit (8), past which it would run eager without a word."""
    from dml_dist.engine import score_step
    from dml_dist.exchange import PeerSums
    from dml_dist.loss import exchange_payload
    from dml_dist.parallel import CompiledPart

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    payloads = torch.stack([exchange_payload(z[k], 3.0) for k in range(3)])
    kinds = {
        "all_gather": lambda w: (z[1], "dml", [1.0, 2.0, 0.5]),
        "all_reduce": lambda w: (PeerSums(payloads.sum(0), 3, payloads[1]), "dml", None),
    }
    for kind, inputs in kinds.items():
        part = CompiledPart(score_step, "default", "loss and meters")
        for step, w in enumerate((0.0, 0.25, 0.5, 0.75, 1.0)):  # kl_ramp's values over a warm-up
            results = []
            for fn in (score_step, part):
                logits = z[1].clone().requires_grad_(True)
                all_logits, mutual, weights = inputs(w)
                if kind != "all_reduce":
                    all_logits = z.clone()
                total, stats, finite = fn(logits, all_logits, 1, y, 3.0, w, mutual, weights)
                total.backward()
                results.append((total.detach(), stats, finite, logits.grad))
            (t0, s0, f0, g0), (t1, s1, f1, g1) = results
            assert bool(f0) and bool(f1)
            # on CPU eager and compiled agree to about 1e-6 here; a wrong graph is off by far more
            assert torch.allclose(t1, t0, rtol=1e-5, atol=1e-6), (kind, step, t0, t1)
            assert torch.allclose(s1, s0, rtol=1e-5, atol=1e-5), (kind, step, s0, s1)
            assert torch.allclose(g1, g0, rtol=1e-4, atol=1e-7), (kind, step)
        assert 1 <= part.graphs <= 2, (kind, part.graphs)
