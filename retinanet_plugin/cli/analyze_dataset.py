"""Dataset analysis for RetinaNet: class counts, box sizes and anchor coverage per level.

    python tools/analyze_dataset.py --config-file configs/retinanet_R18_GN_tiny.yaml \\
        --register-coco mine_train train.json images/ --dataset mine_train --fit-anchors \\
        --output output/analysis

prints per-class box counts, a histogram of box sizes at the test input size, and the anchor
coverage (the fraction of ground-truth boxes that an anchor overlaps with IoU >= the matcher's
foreground threshold, 0.5) overall and per pyramid level, and writes ``analysis.json`` and
``analysis.png`` to ``--output`` (replacing an earlier analysis there only with ``--overwrite``).
``--fit-anchors`` also picks the per-level anchor sizes with the best coverage and prints them as
a ``MODEL.ANCHOR_GENERATOR.SIZES`` override; ``--write-config FILE`` writes a config with them
that builds on ``--config-file`` (a new file).
Trailing ``KEY VALUE`` pairs override the config (e.g. ``INPUT.MIN_SIZE_TEST 512``).
"""

import argparse
import json
import os
import sys

from retinanet_plugin.cli import defaults as cli
from retinanet_plugin.errors import UserError


def argument_parser() -> argparse.ArgumentParser:
    from retinanet_plugin.data import add_dataset_arguments

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    add_dataset_arguments(parser)
    parser.add_argument(
        "--dataset", help="registered dataset to analyze (default: the config's first training set)"
    )
    parser.add_argument("--output", default="output/analysis", help="folder for the json and png")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier analysis in --output"
    )
    parser.add_argument("--fit-anchors", action="store_true", help="fit the anchor sizes")
    parser.add_argument(
        "--write-config",
        metavar="FILE",
        help="with --fit-anchors: write a config with the fitted sizes",
    )
    parser.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


OUTPUTS = ("analysis.json", "analysis.png")


def _check_options(args) -> None:
    if args.write_config and not args.fit_anchors:
        raise UserError("--write-config needs --fit-anchors (it writes the fitted anchor sizes)")
    if args.write_config and os.path.exists(args.write_config):
        raise UserError(f"--write-config {args.write_config} exists; name a new file")
    folder = os.path.dirname(os.path.abspath(args.write_config or "."))
    if not os.path.isdir(folder):
        raise UserError(
            f"--write-config {args.write_config}: folder {folder} does not exist; create it first"
        )
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UserError(f"--output {args.output} is a file; name a folder")
    found = [name for name in OUTPUTS if os.path.exists(os.path.join(args.output, name))]
    if found and not args.overwrite:
        raise UserError(
            f"--output {args.output} holds an earlier analysis ({', '.join(found)}); pass "
            "--overwrite to replace it, or choose another --output"
        )


def _print_report(report: dict, dataset: str) -> None:
    print(
        f"{dataset}: {report['images']} images, {report['boxes']} boxes "
        f"({report['images_without_boxes']} images without boxes)"
    )
    for name, count in report["boxes_per_class"].items():
        share = count / max(report["boxes"], 1)
        print(f"  {name:<24} {count:>8} boxes ({share:.1%})")
    size = report["input_size"]
    print(
        f"box sizes (sqrt of area) at the test size {size['min_size_test']} "
        f"(max {size['max_size_test']}), median {report['box_size']['median']:.1f} px:"
    )
    edges, counts = report["box_size"]["edges"], report["box_size"]["counts"]
    for low, high, count in zip(edges, edges[1:], counts):
        label = f"{low:g}-{high:g} px" if high is not None else f">= {low:g} px"
        print(f"  {label:<14} {count:>8}")
    for title, part in (("anchor sizes", report), ("fitted sizes", report.get("fitted"))):
        if part is None:
            continue
        sizes = [s[0] for s in part["anchor_sizes"]]
        levels = ", ".join(f"{k} {v:.1%}" for k, v in part["coverage_per_level"].items())
        print(
            f"{title} {sizes}: coverage {part['coverage']:.1%} at IoU >= "
            f"{report['iou_threshold']:g} (per level: {levels})"
        )


def main(argv=None) -> int:
    args = cli.parse(argument_parser(), sys.argv[1:] if argv is None else argv)
    from detectron2.data import DatasetCatalog
    from detectron2.utils.logger import setup_logger
    from retinanet_plugin.config.loading import load_config
    from retinanet_plugin.data import dataset_class_names, register_datasets_from_args
    from retinanet_plugin.data.analysis import analyze_dataset, plot_report
    from retinanet_plugin.engine.run_checks import check_dataset

    _check_options(args)
    setup_logger(name="retinanet_plugin")
    register_datasets_from_args(args)
    cfg = load_config(args.config_file, args.opts)
    dataset = args.dataset or (cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else None)
    if dataset is None:
        raise UserError(
            "no dataset: pass --dataset NAME (registered with --register-coco/--register-voc)"
        )
    check_dataset("--dataset", dataset)
    report = analyze_dataset(
        cfg, DatasetCatalog.get(dataset), dataset_class_names(dataset), fit=args.fit_anchors
    )
    report["dataset"] = dataset
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, OUTPUTS[0]), "w") as f:
        json.dump(report, f, indent=1)
    picture = plot_report(report, os.path.join(args.output, OUTPUTS[1]), title=dataset)
    _print_report(report, dataset)
    if args.fit_anchors:
        sizes = report["fitted"]["anchor_sizes"]
        override = "[" + ", ".join(f"[{s[0]:g}]" for s in sizes) + "]"
        print(f'override: MODEL.ANCHOR_GENERATOR.SIZES "{override}"')
        if args.write_config:
            base = os.path.relpath(
                os.path.abspath(args.config_file),
                os.path.dirname(os.path.abspath(args.write_config)),
            )
            with open(args.write_config, "w") as f:
                f.write(
                    f"# {args.config_file} with anchor sizes fitted to {dataset} by "
                    f"tools/analyze_dataset.py (coverage {report['coverage']:.1%} -> "
                    f"{report['fitted']['coverage']:.1%}).\n"
                    f'_BASE_: "{base}"\nMODEL:\n  ANCHOR_GENERATOR:\n    SIZES: {override}\n'
                )
            print(f"wrote {args.write_config}")
    print(f"wrote {os.path.join(args.output, 'analysis.json')} and {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
