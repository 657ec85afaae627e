"""The exchange: ``all_reduce`` of the softmax sums against the ``all_gather`` of every peer's logits."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_cmd

from dml_dist.exchange import resolve_exchange
from dml_dist.loss import compute_dml_loss, exchange_payload, loss_from_sums
from dml_dist.tools.bench_exchange import model_bytes


@pytest.mark.parametrize("mutual", ["dml", "ensemble"])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_sums_give_the_loss_and_gradient_of_the_logits(n, mutual):
    """The algebra (loss.py): from S and H alone, the same value and the same gradient for every peer."""
    g = torch.Generator().manual_seed(n)
    z = torch.randn(n, 12, 7, generator=g) * 4
    y = torch.randint(0, 7, (12,), generator=g)
    summed = sum(exchange_payload(z[k], 2.5) for k in range(n))
    for i in range(n):
        a, b = z[i].clone().requires_grad_(), z[i].clone().requires_grad_()
        la = compute_dml_loss(a, torch.cat([z[:i], z[i + 1 :]]), y, 2.5, 0.6, mutual)
        lb = loss_from_sums(b, summed, n, y, 2.5, 0.6, mutual)
        la.total.backward()
        lb.total.backward()
        assert la.kl.item() > 1e-3
        assert lb.kl.item() == pytest.approx(la.kl.item(), abs=1e-5) and lb.ce.item() == la.ce.item()
        assert torch.allclose(a.grad, b.grad, atol=1e-6), (a.grad - b.grad).abs().max()


def test_all_reduce_trains_like_all_gather_over_gloo():
    """3 peers (a subgroup) and 4, dml and ensemble, T=3, warm-up: the trainer's own step through both
    exchanges over real gloo collectives gives the same losses and, after 6 SGD steps, the same weights
    within 1e-5, while dropping the mutual term moves them by far more."""
    r = run_cmd(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=4",
            str(REPO / "tests" / "scripts" / "exchange_equivalence.py"),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert sorted((x["peers"], x["mutual"], x["weighted"], x["rank"]) for x in rows) == sorted(
        [(n, m, w, k) for n in (3, 4) for m in ("dml", "ensemble") for w in (False, True) for k in range(n)]
    )
    for x in rows:
        assert x["loss_diff"] <= 1e-5 and x["weight_diff"] <= 1e-5, x
        assert x["kl_min"] > 1e-3 and x["moved"] > 1e-2 and x["control_diff"] > 1e-3, x


@pytest.mark.parametrize("mutual", ["dml", "ensemble"])
def test_mutual_weights_weigh_each_peer_in_both_forms(mutual):
    """``mutual_weights``: the mutual term is the weights' mean over the other peers (a direct computation),
    the weighted sums give the same value and gradient, and no weights is the plain mean bit for bit."""
    g = torch.Generator().manual_seed(7)
    n, t, w = 4, 2.0, [1.0, 0.5, 3.0, 1.5]
    z = torch.randn(n, 10, 6, generator=g) * 3
    y = torch.randint(0, 6, (10,), generator=g)
    summed = sum(exchange_payload(z[k], t, w[k]) for k in range(n))
    log_p = (z / t).log_softmax(-1)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        ow = torch.tensor([w[j] for j in others]) / sum(w[j] for j in others)
        if mutual == "dml":
            kls = torch.stack([(log_p[j].exp() * (log_p[j] - log_p[i])).sum(-1).mean() for j in others])
            want = (ow * kls).sum() * t * t
        else:
            q = sum(ow[m] * log_p[j].exp() for m, j in enumerate(others))
            want = (q * (q.log() - log_p[i])).sum(-1).mean() * t * t
        a, b = z[i].clone().requires_grad_(), z[i].clone().requires_grad_()
        la = compute_dml_loss(a, z[others], y, t, 1.0, mutual, weights=[w[j] for j in others])
        lb = loss_from_sums(b, summed, n, y, t, 1.0, mutual, own=exchange_payload(z[i], t, w[i]),
                            rest_weight=sum(w) - w[i])  # fmt: skip
        assert la.kl.item() == pytest.approx(want.item(), rel=1e-5)
        assert lb.kl.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)
        la.total.backward()
        lb.total.backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-6), (a.grad - b.grad).abs().max()
        plain = compute_dml_loss(z[i], z[others], y, t, 1.0, mutual)
        assert abs(la.kl.item() - plain.kl.item()) > 1e-3  # the weights matter here
        # no weights: the loss before mutual_weights existed, bit for bit (that release's formula, copied)
        log_i, log_j = F.log_softmax(z[i] / t, dim=-1), F.log_softmax(z[others] / t, dim=-1)
        if mutual == "dml":
            before = (log_j.exp() * (log_j - log_i.unsqueeze(0))).sum(-1).mean() * (t * t)
        else:
            q = log_j.exp().mean(0)
            before = (q * (q.clamp_min(1e-30).log() - log_i)).sum(-1).mean() * (t * t)
        assert torch.equal(plain.kl, before)


def test_auto_picks_all_reduce_from_three_peers_and_the_byte_model():
    for n, r, mode in (
        (1, 1, "all_gather"),
        (2, 1, "all_gather"),
        (2, 4, "all_gather"),
        (2, [3, 3], "all_gather"),
        (3, 1, "all_reduce"),
        (16, 1, "all_reduce"),
        (2, [1, 7], "all_reduce"),
    ):
        assert resolve_exchange({"exchange": "auto", "model_num": n, "replicas": r})[0] == mode, (n, r)
    assert resolve_exchange({"exchange": "all_gather", "model_num": 8, "replicas": [1, 7]}) == (
        "all_gather",
        "set in the config",
    )
    # all_gather's bytes grow with N; all_reduce's stay below 2 B (C + 1) 4 whatever N
    assert [model_bytes("all_gather", n, 256, 1000) for n in (2, 16)] == [1_024_000, 15_360_000]
    assert all(model_bytes("all_reduce", n, 256, 1000) < 2 * 256 * 1001 * 4 for n in (2, 4, 8, 16, 64))


def test_exchange_benchmark_measures_the_bytes_it_models(tmp_path):
    """``dml-bench --exchange`` on small shapes: loopback bytes per rank match the ring model, all_gather's
    grow with N while all_reduce's stay, and it writes the table, the JSON line and the plot."""
    out, png = tmp_path / "x.jsonl", tmp_path / "x.png"
    r = run_cmd(
        [
            sys.executable,
            "-m",
            "dml_dist.tools.bench",
            "--exchange",
            "peers=[2,3]",
            "batch=64",
            "classes=100",
            "steps=4",
            "rounds=3",  # the bytes are the smallest round's: other tests' localhost traffic only adds
            f"plot={png}",
            f"out={out}",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| N | mode | bytes/rank/step measured |" in r.stdout and png.stat().st_size > 0
    rows = {(x["peers"], x["mode"]): x for x in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(n, m) for n in (2, 3) for m in ("all_gather", "all_reduce")}
    for x in rows.values():  # gloo's headers and the barriers add a little
        assert x["model_bytes_per_rank"] <= x["rx_bytes_per_rank"] <= 1.25 * x["model_bytes_per_rank"], x
        assert x["exchange_ms"] > 0 and x["loss_ms"] > 0
    assert rows[3, "all_gather"]["rx_bytes_per_rank"] > 1.8 * rows[2, "all_gather"]["rx_bytes_per_rank"]
    assert rows[3, "all_reduce"]["rx_bytes_per_rank"] < 1.5 * rows[2, "all_reduce"]["rx_bytes_per_rank"]
