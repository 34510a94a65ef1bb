"""Plots a training run's ``metrics.json``: losses, learning rate, evaluation AP and AP per class.

    python -m retinanet_plugin.plot_metrics output/metrics.json [--output losses.png]

An existing ``--output`` is replaced only with ``--overwrite``.
"""

import argparse
import json
import logging
import os
import sys
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..errors import UserError  # noqa: E402
from . import defaults as cli  # noqa: E402

__all__ = ["MetricsFileError", "check_output", "class_ap_series", "read_metrics", "plot_metrics"]

logger = logging.getLogger("retinanet_plugin.cli.plot_metrics")  # also when run as __main__

LOSS_KEYS = ("total_loss", "loss_cls", "loss_box_reg")
# detectron2 logs the per-class box AP of each evaluation as "bbox/AP-<class name>".
CLASS_AP_PREFIX = "bbox/AP-"
# Above this many classes the per-class panel has no legend.
MAX_LEGEND_CLASSES = 20
# Fewer points than this per curve make no curve: the panel says so instead.
MIN_POINTS = 2


class MetricsFileError(UserError, ValueError):
    """A metrics file that is missing or holds no records."""


def read_metrics(metrics_file: str) -> List[Dict]:
    """The records of detectron2's JSONWriter (one JSON object per line), sorted by iteration.

    A last line cut short (a run killed while writing it) is skipped with a warning.

    Raises:
        MetricsFileError: the file does not exist, is a folder, holds no records, or has a line
            that is not a JSON object before its last line.
    """
    if os.path.isdir(metrics_file):
        raise MetricsFileError(f"{metrics_file} is a folder; name its metrics.json")
    if not os.path.isfile(metrics_file):
        raise MetricsFileError(
            f"{metrics_file} does not exist (train_net.py writes metrics.json into OUTPUT_DIR)"
        )
    with open(metrics_file, encoding="utf-8", errors="replace") as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    records = []
    for number, line in lines:
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if number == lines[-1][0]:
                logger.warning(
                    "%s: skipped its last line %d, cut short (%s)", metrics_file, number, e
                )
                continue
            raise MetricsFileError(
                f"{metrics_file}, line {number}: not a JSON object ({e}); is it detectron2's "
                "metrics.json?"
            ) from e
        records.append(record)
    if not records:
        raise MetricsFileError(f"{metrics_file} holds no records (the run wrote none yet)")
    return sorted(records, key=lambda r: r.get("iteration", 0))


def _series(records: List[Dict], key: str):
    points = [(r["iteration"], r[key]) for r in records if key in r and "iteration" in r]
    return [p[0] for p in points], [p[1] for p in points]


def class_ap_series(records: List[Dict]) -> Dict[str, tuple]:
    """The per-class box AP of each evaluation: {class name: (iterations, AP in percent)}, the
    classes in the order of their first record."""
    names = dict.fromkeys(
        key[len(CLASS_AP_PREFIX) :] for r in records for key in r if key.startswith(CLASS_AP_PREFIX)
    )
    return {name: _series(records, CLASS_AP_PREFIX + name) for name in names}


def _note_too_few(ax, what: str, count: int) -> None:
    ax.text(
        0.5,
        0.5,
        f"{count} {what} row(s): too few to draw",
        ha="center",
        va="center",
        transform=ax.transAxes,
    )


def plot_metrics(metrics_file: str, output_file: str) -> str:
    """Writes a PNG with the losses and learning rate (and box AP, and box AP per class where
    detectron2 logged it, if evaluated) per iteration; a loss or learning-rate panel with fewer
    than :data:`MIN_POINTS` points says so instead of drawing a curve.

    Returns:
        ``output_file``.

    Raises:
        MetricsFileError: see :func:`read_metrics`.
    """
    records = read_metrics(metrics_file)
    has_ap = any("bbox/AP" in r for r in records)
    class_ap = class_ap_series(records)
    panels = 2 + has_ap + bool(class_ap)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    losses = {key: _series(records, key) for key in LOSS_KEYS}
    if max(len(x) for x, _ in losses.values()) >= MIN_POINTS:
        for key, (x, y) in losses.items():
            if x:
                axes[0].plot(x, y, label=key)
        axes[0].set_yscale("log")
        axes[0].legend()
    else:
        _note_too_few(axes[0], "training", len(losses["total_loss"][0]))
    axes[0].set(title="training losses", xlabel="iteration", ylabel="loss")
    lr = _series(records, "lr")
    if len(lr[0]) >= MIN_POINTS:
        axes[1].plot(*lr)
    else:
        _note_too_few(axes[1], "learning-rate", len(lr[0]))
    axes[1].set(title="learning rate", xlabel="iteration", ylabel="lr")
    if has_ap:
        for key in ("bbox/AP", "bbox/AP50", "bbox/AP75"):
            axes[2].plot(*_series(records, key), marker="o", label=key)
        axes[2].set(title="validation box AP", xlabel="iteration", ylabel="AP (%)")
        axes[2].legend()
    if class_ap:
        for name, (x, y) in class_ap.items():
            axes[-1].plot(x, y, marker="o", label=name)
        axes[-1].set(title="validation box AP per class", xlabel="iteration", ylabel="AP (%)")
        if len(class_ap) <= MAX_LEGEND_CLASSES:
            axes[-1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.abspath(metrics_file), fontsize=8)
    fig.tight_layout()
    fig.savefig(output_file, dpi=100)
    plt.close(fig)
    return output_file


def check_output(output_file: str, metrics_file: str, overwrite: bool) -> None:
    """Refuses an output file the plot cannot or should not be written to.

    Raises:
        MetricsFileError: ``output_file`` is a folder or the metrics file, has no or another
            extension than matplotlib's formats, is in a folder that does not exist, or exists
            and ``overwrite`` is False.
    """
    if os.path.isdir(output_file):
        raise MetricsFileError(f"--output {output_file} is a folder; name the image file to write")
    if os.path.exists(metrics_file) and os.path.exists(output_file):
        if os.path.samefile(metrics_file, output_file):
            raise MetricsFileError(
                f"--output {output_file} is the metrics file itself; name an image file, e.g. "
                f"{os.path.join(os.path.dirname(output_file), 'training_curves.png')}"
            )
    extension = os.path.splitext(output_file)[1].lower()
    formats = Figure().canvas.get_supported_filetypes()
    if extension[1:] not in formats:
        what = f"{extension} is not" if extension else "a name without extension is not"
        raise MetricsFileError(
            f"--output {output_file}: {what} an image format matplotlib writes (the format "
            f"follows the extension); use one of {', '.join('.' + f for f in sorted(formats))}"
        )
    folder = os.path.dirname(os.path.abspath(output_file))
    if not os.path.isdir(folder):
        raise MetricsFileError(
            f"--output {output_file}: folder {folder} does not exist; create it first"
        )
    if os.path.exists(output_file) and not overwrite:
        raise MetricsFileError(
            f"--output {output_file} exists; pass --overwrite to replace it, or name a new file"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("metrics_file", help="metrics.json written by detectron2's trainer")
    parser.add_argument(
        "--output",
        help="image file; its extension gives the format (default: training_curves.png beside "
        "the metrics file)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    args = cli.parse(parser, sys.argv[1:] if argv is None else argv)
    output = args.output or os.path.join(os.path.dirname(args.metrics_file), "training_curves.png")
    check_output(output, args.metrics_file, args.overwrite)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    print(plot_metrics(args.metrics_file, output))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
