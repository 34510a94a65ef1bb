"""The paper's ablation configs (configs/ablations) and tools/ablate.py."""

import glob
import json
import os
import re
import sys

import pytest
import torch
from PIL import Image

from conftest import TINY_RUN
from detectron2.modeling import build_model
from retinanet_plugin.cli import defaults as cli
from retinanet_plugin.config.loading import load_config, load_yaml_safely
from retinanet_plugin.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = os.path.join(REPO, "configs", "ablations")
TINY = os.path.join(REPO, "configs", "retinanet_R18_GN_tiny.yaml")
sys.path.insert(0, os.path.join(REPO, "tools"))
import ablate  # noqa: E402  (tools/ablate.py)

LOSS = "MODEL.RETINANET."
OHEM = {"1to3": 0.25, "noratio": -1.0}
# Each file name's pattern and the keys (with values) the name says the file sets itself.
NAME_PATTERNS = {
    r"table1a_ce_alpha(?P<a>[\d.]+)": lambda m: {
        LOSS + "CLS_LOSS_TYPE": "focal",
        LOSS + "FOCAL_LOSS_GAMMA": 0.0,
        LOSS + "FOCAL_LOSS_ALPHA": float(m["a"]),
    },
    r"table1b_fl_gamma(?P<g>[\d.]+)_alpha(?P<a>[\d.]+)": lambda m: {
        LOSS + "CLS_LOSS_TYPE": "focal",
        LOSS + "FOCAL_LOSS_GAMMA": float(m["g"]),
        LOSS + "FOCAL_LOSS_ALPHA": float(m["a"]),
    },
    r"table1c_anchors_(?P<s>\d)scales?_(?P<r>[13])ratios?": lambda m: {
        "MODEL.ANCHOR_GENERATOR.SCALES_PER_OCTAVE": int(m["s"]),
        "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[1.0]] if m["r"] == "1" else [[0.5, 1.0, 2.0]],
    },
    r"table1d_ohem_(?P<ratio>1to3|noratio)_b(?P<b>\d+)_nms(?P<t>[\d.]+)": lambda m: {
        LOSS + "CLS_LOSS_TYPE": "ohem",
        LOSS + "OHEM_BATCH_SIZE_PER_IMAGE": int(m["b"]),
        LOSS + "OHEM_POSITIVE_FRACTION": OHEM[m["ratio"]],
        LOSS + "OHEM_NMS_THRESH": float(m["t"]),
    },
    r"table1d_fl": lambda m: {
        LOSS + "CLS_LOSS_TYPE": "focal",
        LOSS + "FOCAL_LOSS_GAMMA": 2.0,
        LOSS + "FOCAL_LOSS_ALPHA": 0.25,
    },
    r"fl_star_gamma(?P<g>\d)_beta(?P<b>\d)": lambda m: {
        LOSS + "CLS_LOSS_TYPE": "focal_star",
        LOSS + "FOCAL_LOSS_STAR_GAMMA": float(m["g"]),
        LOSS + "FOCAL_LOSS_STAR_BETA": float(m["b"]),
        LOSS + "FOCAL_LOSS_ALPHA": 0.25,
    },
    r"table1e_(?:R101_)?scale(?P<s>\d+)": lambda m: {
        # The paper's longer-side cap: 5/3 of the scale, rounded down (800 -> 1333).
        "INPUT.MIN_SIZE_TRAIN": [int(m["s"])],
        "INPUT.MAX_SIZE_TRAIN": int(m["s"]) * 5 // 3,
        "INPUT.MIN_SIZE_TEST": int(m["s"]),
        "INPUT.MAX_SIZE_TEST": int(m["s"]) * 5 // 3,
    },
}
ROWS = sorted(
    os.path.basename(p)[:-5]
    for p in glob.glob(os.path.join(ABLATIONS, "*.yaml"))
    if not os.path.basename(p).startswith("Base-")
)


def expected_keys(name):
    for pattern, keys in NAME_PATTERNS.items():
        match = re.fullmatch(pattern, name)
        if match:
            return keys(match)
    raise AssertionError(f"configs/ablations/{name}.yaml: the name matches no known ablation")


def cfg_value(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


@pytest.mark.parametrize("name", ROWS)
def test_ablation_config_loads_and_varies_what_its_name_says(name):
    path = os.path.join(ABLATIONS, name + ".yaml")
    expected = expected_keys(name)
    assert ablate.flatten(load_yaml_safely(path, merge_bases=False)) == expected
    cfg = load_config(path)  # the whole _BASE_ chain, validated
    for key, value in expected.items():
        assert cfg_value(cfg, key) == value, key
    # The ablation setting: 600 px unless the row varies the scale; R101 for 1d and 1e R101.
    if not name.startswith("table1e_"):
        assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (600, 1000)
    r101 = name.startswith("table1d_") or name.startswith("table1e_R101")
    assert cfg.MODEL.RESNETS.DEPTH == (101 if r101 else 50)
    assert cfg.MODEL.RETINANET.LOSS_NORMALIZER == "batch"
    assert ablate.paper_ap(path) is not None  # every row names the paper's AP


def test_paper_ap_from_the_leading_comment():
    assert ablate.paper_ap(os.path.join(ABLATIONS, "table1b_fl_gamma2.0_alpha0.25.yaml")) == 34.0
    assert ablate.paper_ap(os.path.join(ABLATIONS, "table1a_ce_alpha0.1.yaml")) == 0.0
    assert ablate.paper_ap(os.path.join(ABLATIONS, "Base-RetinaNet-R50-600.yaml")) is None


def test_anchor_ablation_builds_a_model_with_its_anchors():
    """4 scales x 3 ratios: 12 anchors per location, and a head with 12 x K outputs."""
    cfg = load_config(
        os.path.join(ABLATIONS, "table1c_anchors_4scales_3ratios.yaml"),
        ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"],
    )
    model = build_model(cfg)
    assert model.anchor_generator.num_anchors == [12] * 5
    assert model.head.cls_score.out_channels == 12 * cfg.MODEL.RETINANET.NUM_CLASSES
    # detectron2's order is size-major: every third cell anchor is a new octave scale of P3.
    cells = list(model.anchor_generator.cell_anchors)[0][::3]
    areas = ((cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])).tolist()
    assert areas == pytest.approx([(32 * 2 ** (k / 4)) ** 2 for k in range(4)], rel=1e-4)


def test_model_config_mode_applies_only_the_ablations_own_keys(tmp_path):
    """An OHEM row on the tiny model: its OHEM keys, but not its base's R101 or 600 px."""
    (run,) = ablate.plan_runs([os.path.join(ABLATIONS, "table1d_ohem_1to3_b128_nms0.5.yaml")], TINY)
    path = ablate.write_run_config(run, TINY, str(tmp_path / "run" / "ablation_config.yaml"))
    cfg = load_config(path, ["MODEL.RETINANET.NUM_CLASSES", "4"])
    assert cfg.MODEL.RESNETS.DEPTH == 18 and cfg.INPUT.MIN_SIZE_TEST == 192
    torch.manual_seed(0)
    model = build_model(cfg)
    assert (model.cls_loss_type, model.ohem_batch_size_per_image) == ("ohem", 128)
    assert model.ohem_positive_fraction == 0.25 and model.ohem_nms_thresh == 0.5


def test_identical_runs_are_planned_once_and_varied_keys_cannot_be_overridden():
    files = [
        os.path.join(ABLATIONS, name + ".yaml")
        for name in (
            "table1a_ce_alpha0.75",
            "table1b_fl_gamma0.0_alpha0.75",
            "table1b_fl_gamma2.0_alpha0.25",
        )
    ]
    runs = ablate.plan_runs(files, TINY)
    assert [r["configs"] for r in runs] == [
        ["table1a_ce_alpha0.75", "table1b_fl_gamma0.0_alpha0.75"],
        ["table1b_fl_gamma2.0_alpha0.25"],
    ]
    # Without a model config the two files are different full configs (other _BASE_ keys).
    assert len(ablate.plan_runs(files, None)) == 3
    with pytest.raises(UserError, match="FOCAL_LOSS_GAMMA"):
        ablate.check_overrides(runs, ["MODEL.RETINANET.FOCAL_LOSS_GAMMA", "1.0"])
    ablate.check_overrides(runs, ["SOLVER.MAX_ITER", "3"])


def test_two_config_run_writes_table_json_and_chart(tmp_path, shapes_dataset):
    """A real run of two configs (3 iterations each on the tiny shapes dataset), then a second
    call that reuses both results."""
    configs = [
        os.path.join(ABLATIONS, "table1b_fl_gamma2.0_alpha0.25.yaml"),
        os.path.join(ABLATIONS, "table1d_ohem_noratio_b128_nms0.5.yaml"),
    ]
    argv = [
        "--configs",
        *configs,
        "--model-config",
        TINY,
        "--output",
        str(tmp_path),
        "--register-coco",
        "ablate_train",
        *shapes_dataset["train"],
        "--register-coco",
        "ablate_val",
        *shapes_dataset["val"],
        "DATASETS.TRAIN",
        "('ablate_train',)",
        "DATASETS.TEST",
        "('ablate_val',)",
        *TINY_RUN,
    ]
    assert ablate.main(argv) == 0
    summary = json.loads((tmp_path / "ablations.json").read_text())
    runs = summary["runs"]
    assert [r["config"] for r in runs] == [
        "table1b_fl_gamma2.0_alpha0.25",
        "table1d_ohem_noratio_b128_nms0.5",
    ]
    for run in runs:
        assert run["status"] == "ok" and run["iterations"] == 3
        # The run's own metrics.json holds the same final AP.
        metrics = [json.loads(line) for line in open(tmp_path / run["config"] / "metrics.json")]
        assert [m["bbox/AP"] for m in metrics if "bbox/AP" in m][-1] == run["metrics"]["AP"]
        assert not list((tmp_path / run["config"]).glob("*.pth"))  # weights deleted
    assert runs[1]["varied"]["MODEL.RETINANET.CLS_LOSS_TYPE"] == "ohem"
    assert runs[0]["paper_AP"] == 34.0 and runs[1]["paper_AP"] == 32.8
    table = (tmp_path / "ablations.md").read_text().splitlines()
    assert table[2].startswith("| config | varied keys | paper AP (COCO) | AP |")
    assert len(table) == 6 and table[5].startswith("| table1d_ohem_noratio_b128_nms0.5 | ")
    assert f"{runs[0]['metrics']['AP']:.1f}" in table[4].split(" | ")[3]
    assert Image.open(tmp_path / "ablations_ap.png").size[0] > 0

    timestamps = [os.path.getmtime(tmp_path / r["config"] / "result.json") for r in runs]
    assert ablate.main(argv) == 0  # reuses both results: nothing retrained
    assert [os.path.getmtime(tmp_path / r["config"] / "result.json") for r in runs] == timestamps


@pytest.mark.parametrize(
    "log, reason",
    [
        (
            "[12/03] loading\nerror: DATASETS.TRAIN: dataset 'x' is not registered\n",
            "DATASETS.TRAIN: dataset 'x' is not registered",
        ),
        (
            "Traceback (most recent call last):\n  File ...\nKeyError: 'boom'\n\n",
            "KeyError: 'boom'",
        ),
        ("", "(no output)"),
    ],
)
def test_failed_run_reports_its_own_error(tmp_path, log, reason):
    """A failed run's record says what train_net.py said: its error line, else the last line
    of its log (a traceback's exception)."""
    (tmp_path / "stdout.txt").write_text(log)
    assert ablate.run_error(str(tmp_path / "stdout.txt")) == reason


def test_every_runs_config_is_checked_before_the_first_run(tmp_path, capsys):
    """A bad key in the second config stops ablate before the first config trains."""
    bad = tmp_path / "gamma_typo.yaml"
    bad.write_text("MODEL:\n  RETINANET:\n    FOCAL_LOSS_GAMMAA: 1.0\n")
    good = os.path.join(ABLATIONS, "table1b_fl_gamma2.0_alpha0.25.yaml")
    output = tmp_path / "out"
    argv = ["--configs", good, str(bad), "--model-config", TINY, "--output", str(output)]
    assert cli.run(ablate.main, argv) == 2
    error = capsys.readouterr().err
    assert f"{bad} on --model-config {TINY}" in error
    assert "MODEL.RETINANET.FOCAL_LOSS_GAMMAA" in error
    assert not output.exists()  # nothing ran


def test_a_run_folder_of_an_earlier_ablate_is_its_own(tmp_path):
    """A run folder with ablate's result.json (written before train_net starts, so also after a
    kill) may be replaced; one with only a training run's files may not."""
    runs = ablate.plan_runs([os.path.join(ABLATIONS, "table1d_fl.yaml")], TINY)
    run_dir = tmp_path / "table1d_fl"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"iteration": 0}\n')
    with pytest.raises(UserError, match="holds a training run that tools/ablate.py did not start"):
        ablate.check_output_dirs(str(tmp_path), runs)
    (run_dir / "result.json").write_text('{"status": "running"}')
    ablate.check_output_dirs(str(tmp_path), runs)
