import pytest
import torch
import torch.nn.functional as F

from dml_dist import DMLError, build_model, compute_dml_loss
from dml_dist.models import count_parameters

# He et al. 2016, Table 6 (10 classes). ResNet-110 has 1,727,962 parameters, which the paper rounds to
# "1.7M"; the others are within 1% of the quoted value.
PAPER = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6, "resnet56": 0.85e6}


@pytest.mark.parametrize("name,expected", PAPER.items())
def test_parameter_counts(name, expected):
    n = count_parameters(build_model(name, 10))
    assert abs(n - expected) / expected < 0.01, n


def test_resnet110_parameter_count():
    n = count_parameters(build_model("resnet110", 10))
    assert round(n / 1e6, 1) == 1.7 and n == 1_727_962


def test_registry_is_case_insensitive_and_lists_valid_names():
    assert build_model("ResNet32", 100).fc.out_features == 100
    with pytest.raises(DMLError, match="resnet20, resnet32, resnet44, resnet56, resnet110"):
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
