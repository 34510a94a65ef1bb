"""Plots a training run's ``metrics.json``: losses, learning rate and evaluation AP.

    python -m retinanet_plugin.plot_metrics output/metrics.json [--output losses.png]
"""
import argparse
import json
import os
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["read_metrics", "plot_metrics"]

LOSS_KEYS = ("total_loss", "loss_cls", "loss_box_reg")


def read_metrics(metrics_file: str) -> List[Dict]:
    """The records of detectron2's JSONWriter (one JSON object per line), sorted by iteration."""
    with open(metrics_file, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return sorted(records, key=lambda r: r.get("iteration", 0))


def _series(records: List[Dict], key: str):
    points = [(r["iteration"], r[key]) for r in records if key in r and "iteration" in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(metrics_file: str, output_file: str) -> str:
    """Writes a PNG with the losses and learning rate (and box AP, if evaluated) per iteration.

    Returns:
        ``output_file``.
    """
    records = read_metrics(metrics_file)
    has_ap = any("bbox/AP" in r for r in records)
    fig, axes = plt.subplots(1, 3 if has_ap else 2, figsize=(15 if has_ap else 10, 4))
    for key in LOSS_KEYS:
        x, y = _series(records, key)
        if x:
            axes[0].plot(x, y, label=key)
    axes[0].set(title="training losses", xlabel="iteration", ylabel="loss")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].plot(*_series(records, "lr"))
    axes[1].set(title="learning rate", xlabel="iteration", ylabel="lr")
    if has_ap:
        for key in ("bbox/AP", "bbox/AP50", "bbox/AP75"):
            axes[2].plot(*_series(records, key), marker="o", label=key)
        axes[2].set(title="validation box AP", xlabel="iteration", ylabel="AP (%)")
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.abspath(metrics_file), fontsize=8)
    fig.tight_layout()
    fig.savefig(output_file, dpi=100)
    plt.close(fig)
    return output_file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("metrics_file", help="metrics.json written by detectron2's trainer")
    parser.add_argument("--output", help="PNG file (default: training_curves.png beside it)")
    args = parser.parse_args(argv)
    output = args.output or os.path.join(os.path.dirname(args.metrics_file), "training_curves.png")
    print(plot_metrics(args.metrics_file, output))


if __name__ == "__main__":
    main()
