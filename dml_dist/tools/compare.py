"""Compare runs: DML against independent training (``kl_weight: 0``), as a table and as curves.

    dml-compare logs/dml_s1_summary.json logs/dml_s2_summary.json logs/ind_s1_summary.json ... --out report/

Runs are grouped by their config, ignoring the seed and the keys that only name or file a run
(``IGNORED``). ``report.md``: per group, each peer's best and final validation accuracy as mean ± std over
the group's runs (seeds), the ensemble's, and the DML gain over the group that differs only by
``kl_weight: 0`` (and the mutual term's own settings), when there is one; what the cohort agrees on (the
share of validation samples on which every peer predicts the same class, the mean KL between peer pairs, the
ensemble's gain over the best peer); and the churn between the group's runs, which differ only by seed: the
share of validation samples whose predicted class differs between two runs, per peer and for the ensemble
(mean over pairs of runs). ``curves.png``: validation accuracy and agreement per epoch (mean over seeds), per
peer and ensemble, one colour per group; it needs matplotlib (``pip install 'dml-dist[plot]'``), without which
only ``report.md`` is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from ..config import DEFAULT_CONFIG

# Keys that say how a run was named, filed, logged or launched, not what was trained (``exchange``: the same
# loss and gradient either way, up to float rounding).
IGNORED = (
    "seed",
    "experiment_name",
    "save_dir",
    "log_dir",
    "resume",
    "progress_bar",
    "print_freq",
    "save_freq",
    "save_every_steps",
    "keep_last",
    "consistency_check_every",
    "num_workers",
    "download",
    "exchange",
    "loggers",
)
MUTUAL_KEYS = ("kl_weight", "temperature", "mutual", "kl_warmup_epochs", "mutual_weights")


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _fmt(values: list[float]) -> str:
    m, s = _mean_std(values)
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def _key(cfg: dict, drop=()) -> str:
    cfg = {**DEFAULT_CONFIG, **cfg}  # a summary from before a key existed ran with its default
    return json.dumps({k: v for k, v in sorted(cfg.items()) if k not in IGNORED and k not in drop}, sort_keys=True)


def load_summaries(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        try:
            with open(p) as f:
                s = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            msg = f"dml-compare: error: cannot read {p} ({type(e).__name__}); pass *_summary.json files"
            raise SystemExit(msg) from None
        if not isinstance(s, dict) or "config" not in s or "history" not in s:
            raise SystemExit(f"dml-compare: error: {p} is not a dml-dist summary (no config/history)")
        s["_path"] = p
        runs.append(s)
    return runs


def group_runs(runs: list[dict]) -> list[dict]:
    """[{label, config, runs}] in first-seen order; the label names the config keys that differ between groups."""
    groups: dict[str, dict] = {}
    for r in runs:
        groups.setdefault(_key(r["config"]), {"config": r["config"], "runs": []})["runs"].append(r)
    out = list(groups.values())
    keys = sorted({k for g in out for k in g["config"] if k not in IGNORED})
    varying = [k for k in keys if len({json.dumps(g["config"].get(k)) for g in out}) > 1]
    for g in out:
        g["label"] = ", ".join(f"{k}={g['config'].get(k)}" for k in varying) or "all runs"
    return out


def group_stats(g: dict) -> dict:
    runs = g["runs"]
    n_peers = len(runs[0]["best_accuracies"])
    best = [[r["best_accuracies"][k] for r in runs] for k in range(n_peers)]
    final = [[r["history"][-1]["val_acc"][k] for r in runs] for k in range(n_peers)]
    ens_best = [max(h["ensemble_acc"] for h in r["history"]) for r in runs]
    ens_final = [r["history"][-1]["ensemble_acc"] for r in runs]
    return {
        "best": best,
        "final": final,
        "ens_best": ens_best,
        "ens_final": ens_final,
        "peer_mean_best": [sum(b[i] for b in best) / n_peers for i in range(len(runs))],
    }


def churn(runs: list[dict]) -> list[float] | None:
    """Per peer and for the ensemble (last): the share of validation samples whose predicted class differs
    between two runs, averaged over every pair of runs; None with fewer than two runs that recorded them."""
    preds = [r["final_predictions"] for r in runs if r.get("final_predictions")]
    if len(preds) < 2:
        return None
    pairs = [(a, b) for i, a in enumerate(preds) for b in preds[i + 1 :]]
    out = []
    for k in range(len(preds[0])):
        out.append(sum(sum(x != y for x, y in zip(a[k], b[k])) / len(a[k]) for a, b in pairs) / len(pairs))
    return out


def baseline_of(g: dict, groups: list[dict]) -> dict | None:
    if float(g["config"].get("kl_weight", 1)) == 0:
        return None
    key = _key(g["config"], MUTUAL_KEYS)
    for other in groups:
        if (
            other is not g
            and float(other["config"].get("kl_weight", 1)) == 0
            and _key(other["config"], MUTUAL_KEYS) == key
        ):
            return other
    return None


def report(groups: list[dict]) -> str:
    lines = [
        "# DML comparison",
        "",
        "Validation accuracy (%), mean ± std over each group's runs (seeds). Best: the highest over the "
        "epochs; final: after the last epoch.",
        "",
    ]
    stats = {id(g): group_stats(g) for g in groups}
    for g in groups:
        s = stats[id(g)]
        seeds = sorted(r["config"].get("seed") for r in g["runs"])
        epochs = len(g["runs"][0]["history"])
        lines += [
            f"## {g['label']}",
            "",
            f"{len(g['runs'])} run(s), seeds {seeds}, {epochs} epochs, model {g['config'].get('model')}, "
            f"kl_weight {g['config'].get('kl_weight')}",
            "",
            "| | best val acc | final val acc |",
            "|---|---|---|",
        ]
        for k, (b, f) in enumerate(zip(s["best"], s["final"])):
            lines.append(f"| peer {k + 1} | {_fmt(b)} | {_fmt(f)} |")
        lines.append(
            f"| peers' mean | {_fmt(s['peer_mean_best'])} | "
            f"{_fmt([sum(f[i] for f in s['final']) / len(s['final']) for i in range(len(g['runs']))])} |"
        )
        lines.append(f"| ensemble | {_fmt(s['ens_best'])} | {_fmt(s['ens_final'])} |")
        if all("train_acc" in r["history"][-1] for r in g["runs"]):
            train = [sum(r["history"][-1]["train_acc"]) / len(r["history"][-1]["train_acc"]) for r in g["runs"]]
            lines += [
                "",
                f"Final train accuracy (on augmented batches), peers' mean: {_fmt(train)}: "
                f"the gap to the final validation accuracy shows how far the peers overfit.",
            ]
        cohort = [r["history"][-1] for r in g["runs"]]
        if all("agreement" in h for h in cohort):
            lines += [
                "",
                f"What the cohort agrees on (final epoch, mean ± std over runs): agreement "
                f"{_fmt([h['agreement'] for h in cohort])} %, pairwise KL "
                f"{_mean_std([h['pairwise_kl'] for h in cohort])[0]:.4f} nats, ensemble gain over the best peer "
                f"{_fmt([h['ensemble_gain'] for h in cohort])} points.",
            ]
        c = churn(g["runs"])
        if c is not None:
            lines += [
                "",
                "Churn between runs that differ only by seed (share of validation samples whose predicted class "
                "differs, mean over pairs of runs): "
                + ", ".join(f"peer {k + 1} {100 * v:.2f} %" for k, v in enumerate(c[:-1]))
                + f", ensemble {100 * c[-1]:.2f} %.",
            ]
        base = baseline_of(g, groups)
        if base is not None:
            b = stats[id(base)]
            gain = _mean_std(s["peer_mean_best"])[0] - _mean_std(b["peer_mean_best"])[0]
            gain_ens = _mean_std(s["ens_best"])[0] - _mean_std(b["ens_best"])[0]
            lines += [
                "",
                f"DML gain over `{base['label']}` (kl_weight 0): peers' mean best accuracy "
                f"{100 * gain:+.2f} points, ensemble best {100 * gain_ens:+.2f} points.",
            ]
        lines.append("")
    return "\n".join(lines)


def plot(groups: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "dml-compare: matplotlib is not installed, so curves.png was not written; install it with "
            "pip install 'dml-dist[plot]' (report.md was written)",
            file=sys.stderr,
        )
        return False
    fig, (ax, ax_agree) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["--", ":", "-.", (0, (3, 1, 1, 1))]
    for gi, g in enumerate(groups):
        c = colors[gi % len(colors)]
        epochs = min(len(r["history"]) for r in g["runs"])
        x = list(range(1, epochs + 1))
        n_peers = len(g["runs"][0]["best_accuracies"])
        for k in range(n_peers):
            y = [sum(r["history"][e]["val_acc"][k] for r in g["runs"]) / len(g["runs"]) for e in range(epochs)]
            ax.plot(x, y, color=c, linestyle=styles[k % len(styles)], linewidth=1, label=f"{g['label']}: peer {k + 1}")
        y = [sum(r["history"][e]["ensemble_acc"] for r in g["runs"]) / len(g["runs"]) for e in range(epochs)]
        ax.plot(x, y, color=c, linewidth=2.2, label=f"{g['label']}: ensemble")
        if all("agreement" in r["history"][e] for r in g["runs"] for e in range(epochs)):
            y = [sum(r["history"][e]["agreement"] for r in g["runs"]) / len(g["runs"]) for e in range(epochs)]
            ax_agree.plot(x, y, color=c, linewidth=1.8, label=g["label"])
    ax_agree.set_xlabel("epoch")
    ax_agree.set_ylabel("agreement: every peer predicts the same class")
    ax_agree.grid(alpha=0.3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dml-compare", description=__doc__.split("\n\n")[0])
    p.add_argument("summaries", nargs="+", help="<exp>_summary.json files written by dml-train")
    p.add_argument("--out", default="report", help="output folder for report.md and curves.png (default: report)")
    args = p.parse_args(argv)
    groups = group_runs(load_summaries(args.summaries))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report(groups))
    print(f"wrote {os.path.join(args.out, 'report.md')} ({len(groups)} group(s))")
    if plot(groups, os.path.join(args.out, "curves.png")):
        print(f"wrote {os.path.join(args.out, 'curves.png')}")
    return 0


def cli() -> None:
    """The ``dml-compare`` command (``python -m dml_dist.tools.compare`` alike): ``main``, ended by ``end_with``."""
    from dml_dist.errors import end_with

    end_with(main)


if __name__ == "__main__":
    cli()
