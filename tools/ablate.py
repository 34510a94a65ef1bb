#!/usr/bin/env python
"""Runs ablations: one training + evaluation per config, then one comparison table and chart.

Every config is trained and evaluated by ``train_net.py`` in a process of its own (a crash or a
diverging run is recorded and the others go on). The paper's ablations at small scale, e.g. the
gamma/alpha grid of Table 1a/1b on the demo's generated dataset with the tiny CPU model::

    python tools/ablate.py --configs "configs/ablations/table1b_*.yaml" \\
        --model-config configs/retinanet_R18_GN_tiny.yaml --demo-data \\
        --output output/ablations SOLVER.MAX_ITER 250 SOLVER.STEPS "(195, 235)"

``--model-config``: each ablation YAML contributes only the keys it sets itself (not those of its
``_BASE_`` chain), applied on top of the model config. Without it, each ablation YAML is the full
config (e.g. the paper's R50 600 px COCO setting). Trailing ``KEY VALUE`` pairs (the budget:
``SOLVER.MAX_ITER`` etc.) apply to every run and may not set a key that an ablation varies.
Configs that would train identically (e.g. Table 1a's alpha 0.75 and Table 1b's gamma 0) run once.
Every run's config is loaded with the overrides before the first run starts, so that a bad key or
value stops the command at once.

Datasets: ``--demo-data`` generates and registers the demo's shapes dataset (as tools/demo.py);
otherwise ``--register-coco`` / ``--register-voc`` (as train_net.py) plus ``DATASETS.TRAIN`` /
``DATASETS.TEST`` overrides. A run whose result exists for the same command is not repeated.

Writes ``OUTPUT/<config>/`` (each run: ablation_config.yaml, train_net's outputs, stdout.txt,
result.json; the weights are deleted after evaluation unless ``--keep-weights``) and
``OUTPUT/ablations.md``, ``ablations.json``, ``ablations_ap.png``. A run's result.json is written
before it trains, marking the folder as this tool's: a run folder that holds a training run
without one is refused rather than replaced.
"""

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any, Dict, List, Optional, Sequence

import yaml

from retinanet_plugin.cli import defaults as cli
from retinanet_plugin.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo dataset's registered names (those of configs/retinanet_R18_GN_tiny.yaml).
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
RESULT_FILE = "result.json"


def flatten(mapping: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"MODEL": {"RETINANET": {"X": 1}}} -> {"MODEL.RETINANET.X": 1}."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def own_config(config_file: str) -> Dict[str, Any]:
    """The mapping a config file sets itself, without its ``_BASE_`` chain (loaded safely)."""
    from retinanet_plugin.config.loading import load_yaml_safely

    return load_yaml_safely(config_file, merge_bases=False)


def paper_ap(config_file: str) -> Optional[float]:
    """The paper's AP named in the config's leading comment ("... Lin et al. 2017 ...: AP 34.0"),
    or None."""
    comment = []
    with open(config_file) as f:
        for line in f:
            if not line.startswith("#"):
                break
            comment.append(line[1:].strip())
    text = " ".join(comment)
    match = re.search(r"\bAP (\d+(?:\.\d+)?)\b", text) if "Lin et al. 2017" in text else None
    return float(match.group(1)) if match else None


def expand_configs(patterns: Sequence[str]) -> List[str]:
    """Config files from paths and glob patterns, in the given order, without repeats."""
    files: List[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UserError(f"--configs: {pattern!r} matches no file")
        for path in matches:
            if not os.path.isfile(path):
                raise UserError(f"--configs: {path} does not exist")
            if path not in files:
                files.append(path)
    return files


def config_name(config_file: str) -> str:
    return os.path.splitext(os.path.basename(config_file))[0]


def plan_runs(config_files: Sequence[str], model_config: Optional[str]) -> List[Dict[str, Any]]:
    """One run per distinct training: with a model config, configs setting the same keys to the
    same values share a run.

    Returns:
        per run: "name" (of its first config), "configs" (names), "config_file" (the ablation
        YAML), "own" (the mapping it sets), "varied" (the same as dotted keys) and "paper_AP"
        (of its first config).
    """
    runs: List[Dict[str, Any]] = []
    for path in config_files:
        own = own_config(path)
        varied = flatten(own)
        same = [r for r in runs if model_config and r["varied"] == varied]
        if same:
            same[0]["configs"].append(config_name(path))
            continue
        runs.append(
            {
                "name": config_name(path),
                "configs": [config_name(path)],
                "config_file": path,
                "own": own,
                "varied": varied,
                "paper_AP": paper_ap(path),
            }
        )
    return runs


def check_overrides(runs: Sequence[Dict[str, Any]], opts: Sequence[str]) -> None:
    """Refuses common overrides of a key that an ablation varies (it would hide the ablation)."""
    if len(opts) % 2:
        raise UserError(f"overrides must be KEY VALUE pairs, but {opts[-1]!r} has no value")
    for key in opts[0::2]:
        varying = [r["name"] for r in runs if key in r["varied"]]
        if varying:
            raise UserError(f"the override {key} would replace what {', '.join(varying)} varies")


def check_run_configs(
    runs: Sequence[Dict[str, Any]], model_config: Optional[str], opts: Sequence[str]
) -> None:
    """Loads every run's config with the overrides as train_net.py will, so that a bad key or
    value is refused before the first run starts.

    Raises:
        UserError: the message of ``load_config`` for the first config that fails, naming the
            ablation config (and the model config it applies to).
    """
    from retinanet_plugin.config.loading import load_config

    with tempfile.TemporaryDirectory(prefix="ablate_check_") as tmp:
        for run in runs:
            if not model_config:
                load_config(run["config_file"], opts)
                continue
            # The file train_net.py gets, written aside; the message names the files it is from.
            config_file = write_run_config(
                run, model_config, os.path.join(tmp, run["name"] + ".yaml")
            )
            try:
                load_config(config_file, opts)
            except UserError as e:
                source = f"{run['config_file']} on --model-config {model_config}"
                raise UserError(cli.one_line(e).replace(config_file, source)) from e


def check_output_dirs(output_dir: str, runs: Sequence[Dict[str, Any]]) -> None:
    """Refuses an ``--output`` that is a file, or whose run folders hold a training run that
    this tool did not start (it replaces each run folder's training outputs).

    Raises:
        UserError: naming the folder.
    """
    from retinanet_plugin.engine.run_checks import earlier_run_outputs

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output {output_dir} is a file; name a folder for the ablations")
    for run in runs:
        run_dir = os.path.join(output_dir, run["name"])
        found = earlier_run_outputs(run_dir)
        if found and not os.path.isfile(os.path.join(run_dir, RESULT_FILE)):
            raise UserError(
                f"--output {output_dir}: {run_dir} holds a training run that tools/ablate.py did "
                f"not start ({', '.join(found)}), which its run would replace; choose another "
                "--output"
            )


def write_run_config(run: Dict[str, Any], model_config: str, path: str) -> str:
    """A config file: the model config as ``_BASE_`` plus the ablation's own keys."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# {run['name']}: the keys of {run['config_file']} on top of {model_config}\n")
        yaml.safe_dump({"_BASE_": os.path.abspath(model_config), **run["own"]}, f, sort_keys=False)
    return path


def read_run_metrics(metrics_file: str) -> Dict[str, Any]:
    """Final COCO metrics (NaN as None) and the number of iterations of a run's metrics.json."""
    from demo import final_metrics  # tools/demo.py, next to this file

    from retinanet_plugin.cli.plot_metrics import read_metrics

    records = read_metrics(metrics_file)
    iterations = max((r["iteration"] for r in records if "total_loss" in r), default=-1) + 1
    return {"metrics": final_metrics(metrics_file), "iterations": iterations}


def run_one(
    run: Dict[str, Any],
    config_file: str,
    run_dir: str,
    train_net_args: List[str],
    opts: List[str],
    keep_weights: bool = False,
) -> Dict[str, Any]:
    """Trains and evaluates one config with train_net.py; returns its result record."""
    command = [
        sys.executable,
        os.path.join(REPO, "train_net.py"),
        "--config-file",
        config_file,
        "--overwrite",  # the run folder is this tool's; a reused result returned above
        *train_net_args,
        *opts,
        "OUTPUT_DIR",
        run_dir,
    ]
    result_file = os.path.join(run_dir, RESULT_FILE)
    if os.path.isfile(result_file):
        with open(result_file) as f:
            previous = json.load(f)
        if previous.get("command") == command[1:] and previous.get("status") == "ok":
            print(f"[ablate] {run['name']}: reusing {result_file}", flush=True)
            return previous
    os.makedirs(run_dir, exist_ok=True)
    record: Dict[str, Any] = {
        "config": run["name"],
        "same_as": run["configs"][1:],
        "config_file": run["config_file"],
        "varied": run["varied"],
        "paper_AP": run["paper_AP"],
        "status": "running",
        "command": command[1:],
    }
    # Marks the folder as this tool's (check_output_dirs) before train_net writes into it.
    with open(result_file, "w") as f:
        json.dump(record, f, indent=2)
    print(f"[ablate] {run['name']}: training, log in {run_dir}/stdout.txt", flush=True)
    start = time.perf_counter()
    with open(os.path.join(run_dir, "stdout.txt"), "w") as log:
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    record["wall_time_s"] = round(time.perf_counter() - start, 1)
    try:
        if returncode != 0:
            reason = run_error(os.path.join(run_dir, "stdout.txt"))
            raise RuntimeError(f"train_net.py exited with {returncode}: {reason}")
        record.update(read_run_metrics(os.path.join(run_dir, "metrics.json")))
        record["status"] = "ok"
        if not keep_weights:  # ~150 MB per tiny run (weights and optimizer state)
            pointer = os.path.join(run_dir, "last_checkpoint")
            for checkpoint in glob.glob(os.path.join(run_dir, "*.pth")) + [pointer]:
                if os.path.isfile(checkpoint):
                    os.remove(checkpoint)
    except (RuntimeError, OSError, ValueError) as e:
        record.update(status=f"failed: {e}", metrics={}, iterations=None)
    with open(result_file, "w") as f:
        json.dump(record, f, indent=2)
    ap = record["metrics"].get("AP")
    print(
        f"[ablate] {run['name']}: {record['status']}, AP {ap}, {record['wall_time_s']} s",
        flush=True,
    )
    return record


def run_error(log_file: str) -> str:
    """What a failed run said last: its ``error: ...`` line, else the last line of its log
    (the exception of a traceback)."""
    with open(log_file, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1][len("error: ") :]
    return lines[-1] if lines else "(no output)"


def _number(value: Optional[float]) -> str:
    """ "12.3", or "n/a" for a missing or undefined (NaN) metric."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.1f}"


def _short(varied: Dict[str, Any]) -> str:
    """ "FOCAL_LOSS_GAMMA=2.0, FOCAL_LOSS_ALPHA=0.25" (last part of each key)."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in varied.items()) or "(none)"


def markdown_table(records: Sequence[Dict[str, Any]], title: str) -> str:
    """The comparison table as markdown."""
    with_paper = any(r.get("paper_AP") is not None for r in records)
    header = ["config", "varied keys"] + (["paper AP (COCO)"] if with_paper else [])
    header += list(METRICS) + ["iterations", "wall time"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        name = " = ".join([r["config"], *r.get("same_as", [])])
        if r["status"] != "ok":
            name += f" ({r['status']})"
        row = [name, _short(r["varied"])] + ([_number(r.get("paper_AP"))] if with_paper else [])
        row += [_number(r["metrics"].get(m)) for m in METRICS]
        row += [str(r["iterations"] or "n/a"), f"{r['wall_time_s'] / 60:.1f} min"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_ap(records: Sequence[Dict[str, Any]], output_file: str, title: str) -> str:
    """Horizontal bar chart of the AP of each run (failed runs show no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in records]
    values = [r["metrics"].get("AP") or 0.0 for r in records]
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(records) + 1.2))
    bars = axes.barh(range(len(records)), values, color="tab:blue")
    axes.bar_label(bars, labels=[_number(r["metrics"].get("AP")) for r in records], padding=3)
    axes.set_yticks(range(len(records)), names)
    axes.invert_yaxis()  # first config on top, as in the table
    axes.set_xlabel("box AP")
    axes.set_xlim(0, max(values + [1.0]) * 1.15)
    axes.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=10)
    figure.tight_layout()
    figure.savefig(output_file, dpi=100)
    plt.close(figure)
    return output_file


def write_outputs(records: Sequence[Dict[str, Any]], output_dir: str, title: str) -> List[str]:
    """ablations.md, ablations.json and ablations_ap.png in ``output_dir``."""
    paths = [os.path.join(output_dir, f"ablations{s}") for s in (".md", ".json", "_ap.png")]
    with open(paths[0], "w") as f:
        f.write(markdown_table(records, title))
    with open(paths[1], "w") as f:
        json.dump({"title": title, "runs": list(records)}, f, indent=2)
    plot_ap(records, paths[2], title)
    return paths


def argument_parser() -> argparse.ArgumentParser:
    from retinanet_plugin.data import add_dataset_arguments

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--configs", nargs="+", required=True, help="YAML files or glob patterns")
    parser.add_argument(
        "--model-config",
        help="apply only each config's own keys on top of this config (e.g. "
        "configs/retinanet_R18_GN_tiny.yaml)",
    )
    parser.add_argument("--output", default=os.path.join(REPO, "output", "ablations"))
    parser.add_argument("--title", default=None, help="title of the table and chart")
    parser.add_argument(
        "--demo-data", action="store_true", help="generate and use the demo's shapes dataset"
    )
    parser.add_argument("--num-train", type=int, default=600, help="--demo-data train images")
    parser.add_argument("--num-val", type=int, default=100, help="--demo-data validation images")
    parser.add_argument("--image-size", type=int, default=192, help="--demo-data image side")
    parser.add_argument(
        "--keep-weights", action="store_true", help="keep each run's checkpoints (*.pth)"
    )
    parser.add_argument("--num-gpus", type=int, default=1, help="train_net.py's, for every run")
    add_dataset_arguments(parser)
    parser.add_argument(cli.DEBUG_FLAG, action="store_true", help=cli.DEBUG_HELP)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="overrides for every run: KEY VALUE")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = cli.parse(argument_parser(), sys.argv[1:] if argv is None else argv)
    runs = plan_runs(expand_configs(args.configs), args.model_config)
    opts = list(args.opts)
    check_overrides(runs, opts)
    check_output_dirs(args.output, runs)
    train_net_args: List[str] = []
    for option, datasets in (
        ("--register-coco", args.register_coco),
        ("--register-voc", args.register_voc),
    ):
        for dataset in datasets:
            train_net_args += [option, *dataset]
    if args.voc_classes:
        train_net_args += ["--voc-classes", args.voc_classes]
    if args.num_gpus != 1:
        train_net_args += ["--num-gpus", str(args.num_gpus)]
    title = args.title or "Ablations"
    if args.demo_data:
        from demo import check_demo_data  # tools/demo.py, next to this file

        from retinanet_plugin.data import DEMO_TRAIN, DEMO_VAL, make_demo_dataset_args

        check_demo_data(args.num_train, args.num_val, args.image_size)
        opts += ["DATASETS.TRAIN", f"('{DEMO_TRAIN}',)", "DATASETS.TEST", f"('{DEMO_VAL}',)"]
    check_run_configs(runs, args.model_config, opts)
    if args.demo_data:
        train_net_args += make_demo_dataset_args(
            os.path.join(args.output, "data"), args.num_train, args.num_val, args.image_size
        )
        title = args.title or (
            f"Ablations on the synthetic shapes dataset ({args.num_train} train / {args.num_val} "
            f"val images, {args.image_size} px), not COCO"
        )
    records = []
    for run in runs:
        run_dir = os.path.join(args.output, run["name"])
        config_file = run["config_file"]
        if args.model_config:
            config_file = write_run_config(
                run, args.model_config, os.path.join(run_dir, "ablation_config.yaml")
            )
        records.append(
            run_one(run, config_file, run_dir, train_net_args, opts, keep_weights=args.keep_weights)
        )
    for path in write_outputs(records, args.output, title):
        print(f"[ablate] wrote {path}")
    print(markdown_table(records, title))
    failed = [r["config"] for r in records if r["status"] != "ok"]
    if failed:
        print(f"[ablate] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
