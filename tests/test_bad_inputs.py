"""Every bad input gets one line ``error: ...`` naming the file, key or value, exit status 2 and
no traceback, from every entry point, before any long work starts.

Each case runs the entry point's ``main`` in this process through ``retinanet_plugin.cli.run``
(the subprocess tests at the end check the real command lines). The table in docs/reliability.md
is generated from these cases: :func:`test_readme_table_lists_every_case` fails when it is stale,
and rewrites it when run with ``UPDATE_DOCS=1``
(``UPDATE_DOCS=1 pytest tests/test_bad_inputs.py``).
"""

import json
import os
import re
import subprocess
import sys
from typing import Callable, Dict, List, NamedTuple

import pytest
import torch

import retinanet_plugin  # noqa: F401  (compat patches before any detectron2 submodule)
from conftest import isolated_process_state
from detectron2.modeling import build_model
from retinanet_plugin import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # train_net.py
sys.path.insert(0, os.path.join(REPO, "tools"))
TINY = os.path.join(REPO, "configs", "retinanet_R18_GN_tiny.yaml")
RELIABILITY_DOC = os.path.join(REPO, "docs", "reliability.md")
TABLE_START, TABLE_END = "<!-- bad-inputs -->", "<!-- /bad-inputs -->"
# Bounds what a case would run if its check did not fire.
SHORT = ["SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"]


class Case(NamedTuple):
    entry: str  # the command (train_net.py, predict, plot_metrics, export.py, ablate.py, demo.py)
    what: str  # the bad input, for the docs' table
    argv: Callable[["Env"], List[str]]
    expected: List[str]  # fragments the message must contain (the file / key / value named)


class Env:
    """Files the cases refer to, made once per test in ``tmp_path``."""

    def __init__(self, tmp_path, shapes_dataset, name: str):
        self.tmp = tmp_path
        self.name = name
        (self.train_json, self.train_root), (self.val_json, self.val_root) = (
            shapes_dataset["train"],
            shapes_dataset["val"],
        )
        self.out = str(tmp_path / "out")

    def path(self, name: str, content=None) -> str:
        path = self.tmp / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        return str(path)

    def register(self) -> List[str]:
        """train_net's dataset options for the shapes splits, under names unique to the test."""
        return [
            "--register-coco",
            f"{self.name}_train",
            self.train_json,
            self.train_root,
            "--register-coco",
            f"{self.name}_val",
            self.val_json,
            self.val_root,
        ]

    def train(self, *extra: str) -> List[str]:
        """A correct train_net command line, then ``extra``."""
        return [
            "--config-file",
            TINY,
            *self.register(),
            "DATASETS.TRAIN",
            f"('{self.name}_train',)",
            "DATASETS.TEST",
            f"('{self.name}_val',)",
            *SHORT,
            "OUTPUT_DIR",
            self.out,
            *extra,
        ]

    def export(self, format: str, output: str, *extra: str) -> List[str]:
        """tools/export.py's arguments for the tiny model with weights, then ``extra``."""
        return [
            "--config-file",
            TINY,
            "--weights",
            self.weights(),
            "--format",
            format,
            "--output",
            output,
            *extra,
        ]

    def weights(self) -> str:
        """An untrained tiny model's checkpoint (a valid weights file)."""
        from conftest import plugin_cfg

        path = self.tmp / "weights.pth"
        if not path.exists():
            model = build_model(plugin_cfg("retinanet_R18_GN_tiny.yaml"))
            torch.save({"model": model.state_dict()}, path)
        return str(path)

    def coco_copy(self, edit: Callable[[Dict], None]) -> str:
        with open(self.train_json) as f:
            data = json.load(f)
        edit(data)
        return self.path("edited.json", json.dumps(data))

    def predict(self, *extra: str) -> List[str]:
        return [
            "--config-file",
            TINY,
            "--input",
            self.val_root,
            "--output",
            str(self.tmp / "pred"),
            *extra,
        ]


def _duplicate_image_id(data):
    data["images"][1]["id"] = data["images"][0]["id"]


def _wrong_weights(env: Env) -> str:
    path = env.tmp / "other.pth"
    torch.save({"model": {"backbone.body.conv1.weight": torch.zeros(1)}}, path)
    return str(path)


def _bad_pointer(env: Env) -> List[str]:
    os.makedirs(env.out, exist_ok=True)
    env.path("out/last_checkpoint", "model_0000999.pth")
    return env.train("--resume")


def _base_cycle(env: Env) -> List[str]:
    env.path("b.yaml", "_BASE_: a.yaml\n")
    return ["--config-file", env.path("a.yaml", "_BASE_: b.yaml\n")]


def _earlier_demo(env: Env) -> List[str]:
    os.makedirs(env.out, exist_ok=True)
    env.path("out/metrics.json", "{}\n")
    return ["--output", env.out]


def _finished_run(env: Env) -> List[str]:
    os.makedirs(env.out, exist_ok=True)
    env.path("out/model_final.pth", b"weights")
    env.path("out/metrics.json", '{"iteration": 0, "total_loss": 1.0}\n')
    return env.train()


CASES: Dict[str, Case] = {
    # -- train_net.py: config file ----------------------------------------------------------
    "config-missing": Case(
        "train_net.py",
        "`--config-file` that does not exist",
        lambda e: ["--config-file", e.path("nope.yaml")],
        ["nope.yaml", "does not exist"],
    ),
    "config-folder": Case(
        "train_net.py",
        "`--config-file` that is a folder",
        lambda e: ["--config-file", str(e.tmp)],
        ["is a folder"],
    ),
    "config-empty": Case(
        "train_net.py",
        "empty config file",
        lambda e: ["--config-file", e.path("empty.yaml", "")],
        ["empty.yaml", "is empty"],
    ),
    "base-cycle": Case(
        "train_net.py",
        "`_BASE_` chain that loops",
        _base_cycle,
        ["a.yaml", "cycle"],
    ),
    "config-yaml": Case(
        "train_net.py",
        "YAML syntax error",
        lambda e: ["--config-file", e.path("bad.yaml", "MODEL: [\n")],
        ["bad.yaml", "line"],
    ),
    "unknown-key": Case(
        "train_net.py",
        "misspelled override key",
        lambda e: e.train("SOLVER.BASE_LRR", "0.1"),
        ["SOLVER.BASE_LRR", "SOLVER.BASE_LR"],
    ),
    "override-no-value": Case(
        "train_net.py",
        "override without a value",
        lambda e: e.train("SOLVER.BASE_LR"),
        ["'SOLVER.BASE_LR' has no value"],
    ),
    "wrong-type": Case(
        "train_net.py",
        "override of the wrong type",
        lambda e: e.train("SOLVER.MAX_ITER", "lots"),
        ["SOLVER.MAX_ITER", "'lots'"],
    ),
    # -- train_net.py: options --------------------------------------------------------------
    "unknown-option": Case(
        "train_net.py",
        "unknown option",
        lambda e: e.train("--resmue"),
        ["unknown option --resmue"],
    ),
    "register-too-few": Case(
        "train_net.py",
        "`--register-coco` with two of its three values, before overrides",
        lambda e: ["--config-file", TINY, "--register-coco", "x", "x.json", "SOLVER.MAX_ITER", "1"],
        ["--register-coco takes 3 value(s)", "NAME JSON IMAGE_ROOT", "'SOLVER.MAX_ITER'"],
    ),
    "num-gpus-0": Case(
        "train_net.py",
        "`--num-gpus 0`",
        lambda e: e.train("--num-gpus", "0"),
        ["--num-gpus 0"],
    ),
    "batch-not-divisible": Case(
        "train_net.py",
        "`SOLVER.IMS_PER_BATCH` not divisible by the processes",
        lambda e: e.train("--num-gpus", "2", "SOLVER.IMS_PER_BATCH", "3"),
        ["SOLVER.IMS_PER_BATCH = 3", "2 processes"],
    ),
    "cuda-without-gpu": Case(
        "train_net.py",
        "`--num-gpus 2` with `MODEL.DEVICE cuda` on a machine without a GPU",
        lambda e: e.train("--num-gpus", "2", "MODEL.DEVICE", "cuda"),
        ["MODEL.DEVICE = 'cuda'", "no CUDA GPU"],
    ),
    # -- train_net.py: config values --------------------------------------------------------
    "device-unknown": Case(
        "train_net.py",
        "unknown `MODEL.DEVICE`",
        lambda e: e.train("MODEL.DEVICE", "tpu"),
        ["MODEL.DEVICE = 'tpu'"],
    ),
    "input-format": Case(
        "train_net.py",
        "unknown `INPUT.FORMAT`",
        lambda e: e.train("INPUT.FORMAT", "BRG"),
        ["INPUT.FORMAT = 'BRG'", "'BGR'"],
    ),
    "pixel-mean-length": Case(
        "train_net.py",
        "`MODEL.PIXEL_MEAN` of the wrong length",
        lambda e: e.train("MODEL.PIXEL_MEAN", "[103.5, 116.3]"),
        ["MODEL.PIXEL_MEAN", "3 number"],
    ),
    "min-size-negative": Case(
        "train_net.py",
        "negative `INPUT.MIN_SIZE_TRAIN`",
        lambda e: e.train("INPUT.MIN_SIZE_TRAIN", "(-128,)"),
        ["INPUT.MIN_SIZE_TRAIN", "(-128,)"],
    ),
    "workers-negative": Case(
        "train_net.py",
        "negative `DATALOADER.NUM_WORKERS`",
        lambda e: e.train("DATALOADER.NUM_WORKERS", "-1"),
        ["DATALOADER.NUM_WORKERS = -1"],
    ),
    "test-aug": Case(
        "train_net.py",
        "`TEST.AUG.ENABLED True`",
        lambda e: e.train("TEST.AUG.ENABLED", "True"),
        ["TEST.AUG.ENABLED", "test-time augmentation"],
    ),
    # -- train_net.py: datasets -------------------------------------------------------------
    "test-set-unregistered": Case(
        "train_net.py",
        "`DATASETS.TEST` not registered (only `DATASETS.TRAIN` set)",
        lambda e: [
            "--config-file",
            TINY,
            *e.register(),
            "DATASETS.TRAIN",
            f"('{e.name}_train',)",
            *SHORT,
            "OUTPUT_DIR",
            e.out,
        ],
        ["DATASETS.TEST", "'retinanet_demo_val' is not registered", "--register-coco"],
    ),
    "train-set-typo": Case(
        "train_net.py",
        "misspelled `DATASETS.TRAIN` name",
        lambda e: e.train("DATASETS.TRAIN", f"('{e.name}_trian',)"),
        ["DATASETS.TRAIN", "_trian' is not registered", "did you mean"],
    ),
    "register-missing-json": Case(
        "train_net.py",
        "`--register-coco` with a missing JSON",
        lambda e: [
            "--config-file",
            TINY,
            "--register-coco",
            f"{e.name}_x",
            e.path("missing.json"),
            e.train_root,
        ],
        ["missing.json", "does not exist"],
    ),
    "duplicate-image-id": Case(
        "train_net.py",
        "COCO JSON with two images of one id",
        lambda e: [
            "--config-file",
            TINY,
            "--register-coco",
            f"{e.name}_dup",
            e.coco_copy(_duplicate_image_id),
            e.train_root,
            "DATASETS.TRAIN",
            f"('{e.name}_dup',)",
            "DATASETS.TEST",
            "()",
            *SHORT,
            "OUTPUT_DIR",
            e.out,
        ],
        ["edited.json", "2 images have id", "must be unique"],
    ),
    # -- train_net.py: weights and output folder --------------------------------------------
    "weights-missing": Case(
        "train_net.py",
        "`MODEL.WEIGHTS` that does not exist",
        lambda e: e.train("MODEL.WEIGHTS", e.path("gone.pth")),
        ["MODEL.WEIGHTS", "gone.pth"],
    ),
    "weights-folder": Case(
        "train_net.py",
        "`MODEL.WEIGHTS` that is a folder",
        lambda e: e.train("MODEL.WEIGHTS", str(e.tmp)),
        ["MODEL.WEIGHTS", "is a folder"],
    ),
    "weights-no-match": Case(
        "train_net.py",
        "weights of another architecture (no tensor fits)",
        lambda e: e.train("MODEL.WEIGHTS", _wrong_weights(e)),
        ["other.pth", "none of its 1 tensors fits", "MODEL.WEIGHTS ''"],
    ),
    "weights-not-a-checkpoint": Case(
        "train_net.py",
        "`MODEL.WEIGHTS` that is not a weights file",
        lambda e: e.train("MODEL.WEIGHTS", e.path("notes.pth", b"not a checkpoint")),
        ["notes.pth"],
    ),
    "eval-only-no-weights": Case(
        "train_net.py",
        "`--eval-only` without weights",
        lambda e: e.train("--eval-only"),
        ["--eval-only", "randomly initialized"],
    ),
    "bad-last-checkpoint": Case(
        "train_net.py",
        "`--resume` with garbage in `last_checkpoint`",
        _bad_pointer,
        ["last_checkpoint names 'model_0000999.pth'"],
    ),
    "output-holds-run": Case(
        "train_net.py",
        "`OUTPUT_DIR` holding a finished run (no `--resume`/`--overwrite`)",
        _finished_run,
        ["holds an earlier run", "model_final.pth", "--resume", "--overwrite"],
    ),
    "output-is-file": Case(
        "train_net.py",
        "`OUTPUT_DIR` that is a file",
        lambda e: e.train("OUTPUT_DIR", e.path("afile", "x")),
        ["OUTPUT_DIR", "is a file"],
    ),
    # -- predict -----------------------------------------------------------------------------
    "predict-threshold": Case(
        "predict",
        "`--score-threshold` outside [0, 1]",
        lambda e: e.predict("--score-threshold", "1.5"),
        ["--score-threshold 1.5", "[0, 1]"],
    ),
    "predict-batch-size": Case(
        "predict",
        "`--batch-size 0`",
        lambda e: e.predict("--batch-size", "0"),
        ["--batch-size 0"],
    ),
    "predict-tile-overlap": Case(
        "predict",
        "`--tile-overlap 1`",
        lambda e: e.predict("--tile", "256", "--tile-overlap", "1"),
        ["--tile-overlap 1", "[0, 1)"],
    ),
    "predict-no-weights": Case(
        "predict",
        "no weights",
        lambda e: e.predict(),
        ["no weights", "MODEL.WEIGHTS"],
    ),
    "predict-output-file": Case(
        "predict",
        "`--output` that is a file",
        lambda e: e.predict("--output", e.path("taken.txt", "x")),
        ["taken.txt", "is a file"],
    ),
    "predict-no-input": Case(
        "predict",
        "`--input` matching no image",
        lambda e: [
            "--config-file",
            TINY,
            "--input",
            e.path("nothing*.jpg"),
            "--output",
            str(e.tmp / "pred"),
            "MODEL.WEIGHTS",
            e.weights(),
        ],
        ["nothing*.jpg", "no image file matched"],
    ),
    "predict-dataset": Case(
        "predict",
        "`--dataset` not registered",
        lambda e: e.predict("--dataset", "shapez"),
        ["--dataset shapez", "not registered"],
    ),
    "predict-device": Case(
        "predict",
        "`MODEL.DEVICE cuda` on a machine without a GPU",
        lambda e: e.predict("MODEL.WEIGHTS", e.weights(), "MODEL.DEVICE", "cuda"),
        ["MODEL.DEVICE = 'cuda'", "no CUDA GPU"],
    ),
    # -- plot_metrics --------------------------------------------------------------------------
    "metrics-missing": Case(
        "plot_metrics",
        "metrics file that does not exist",
        lambda e: [e.path("metrics.json")],
        ["metrics.json", "does not exist"],
    ),
    "metrics-empty": Case(
        "plot_metrics",
        "empty metrics file",
        lambda e: [e.path("metrics.json", "")],
        ["metrics.json", "holds no records"],
    ),
    "metrics-corrupt": Case(
        "plot_metrics",
        "metrics file with a broken line before the last",
        lambda e: [e.path("metrics.json", '{"iteration": 0}\nnot json\n{"iteration": 1}\n')],
        ["metrics.json, line 2"],
    ),
    # -- tools/export.py -------------------------------------------------------------------------
    "export-folder": Case(
        "export.py",
        "`--output` in a folder that does not exist",
        lambda e: e.export("onnx", str(e.tmp / "missing" / "model.onnx")),
        ["missing", "does not exist"],
    ),
    "export-no-weights": Case(
        "export.py",
        "no weights",
        lambda e: ["--config-file", TINY, "--format", "onnx", "--output", e.path("m.onnx")],
        ["no weights to export"],
    ),
    "export-sample": Case(
        "export.py",
        "`--sample-image` that is not an image",
        lambda e: e.export(
            "torchscript", e.path("m.ts"), "--sample-image", e.path("x.png", b"nope")
        ),
        ["x.png", "cannot be read as an image"],
    ),
    # -- tools/ablate.py, tools/analyze_dataset.py, tools/demo.py ------------------------------
    "ablate-configs": Case(
        "ablate.py",
        "`--configs` matching no file",
        lambda e: ["--configs", e.path("nope_*.yaml"), "--output", e.out],
        ["nope_*.yaml", "matches no file"],
    ),
    "analyze-dataset": Case(
        "analyze_dataset.py",
        "`--dataset` not registered",
        lambda e: ["--config-file", TINY, *e.register(), "--dataset", f"{e.name}_trian"],
        ["--dataset", "_trian", "is not registered", "did you mean"],
    ),
    "analyze-write-config": Case(
        "analyze_dataset.py",
        "`--write-config` naming an existing file",
        lambda e: [
            "--config-file",
            TINY,
            "--fit-anchors",
            "--write-config",
            e.path("mine.yaml", ""),
        ],
        ["mine.yaml exists"],
    ),
    "demo-output": Case(
        "demo.py",
        "`--output` holding an earlier demo run",
        _earlier_demo,
        ["holds an earlier run", "--overwrite"],
    ),
}


def _entry_main(entry: str):
    if entry == "train_net.py":
        import train_net

        return train_net.main
    if entry == "predict":
        from retinanet_plugin import predict

        return predict.main
    if entry == "plot_metrics":
        from retinanet_plugin import plot_metrics

        return plot_metrics.main
    import importlib

    return importlib.import_module(entry[: -len(".py")]).main  # tools/<entry>


@pytest.fixture(autouse=True)
def _no_state_left_behind():
    """Each case's message depends on the case alone (see conftest.isolated_process_state)."""
    with isolated_process_state():
        yield


# The message of each case, as the docs' table shows it (temporary paths replaced).
MESSAGES: Dict[str, str] = {}


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input_is_one_clear_line(case_id, tmp_path, shapes_dataset, capsys):
    case = CASES[case_id]
    if case_id in ("predict-device", "cuda-without-gpu") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = Env(tmp_path, shapes_dataset, re.sub(r"\W", "_", case_id))
    argv = case.argv(env)
    capsys.readouterr()
    status = cli.run(_entry_main(case.entry), argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2, err[-3000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    for fragment in case.expected:
        assert fragment in errors[0], errors[0]
    MESSAGES[case_id] = errors[0].replace(str(tmp_path), "<tmp>").replace(REPO, "<repo>")


def render_table(messages: Dict[str, str]) -> str:
    rows = ["| command | bad input | message |", "|---|---|---|"]
    for case_id, case in CASES.items():
        message = messages.get(case_id, "(skipped on this machine)").replace("|", "\\|")
        rows.append(f"| `{case.entry}` | {case.what} | {message} |")
    return "\n".join(rows) + "\n"


def test_docs_table_lists_every_case():
    """docs/reliability.md's table shows every case with the message it produced in this run."""
    missing = [c for c in CASES if c not in MESSAGES]
    if missing:
        pytest.skip(f"{len(missing)} cases did not run in this session (e.g. {missing[0]})")
    with open(RELIABILITY_DOC) as f:
        text = f.read()
    head, rest = text.split(TABLE_START, 1)
    block, tail = rest.split(TABLE_END, 1)
    table = render_table(MESSAGES)
    if os.environ.get("UPDATE_DOCS") == "1":
        with open(RELIABILITY_DOC, "w") as f:
            f.write(head + TABLE_START + "\n" + table + TABLE_END + tail)
    stale = "docs/reliability.md's bad-input table is stale: UPDATE_DOCS=1 pytest " + __file__
    assert block.strip("\n") + "\n" == table or os.environ.get("UPDATE_DOCS") == "1", stale


# ---------------------------------------------------------------------------------------------
# The real command lines

# (entry point, how Python runs it, arguments with a bad input)
COMMAND_LINES = [
    ("train_net", ("path", "train_net.py"), ["--config-file", "nope.yaml"]),
    (
        "predict",
        ("module", "retinanet_plugin.predict"),
        ["--config-file", TINY, "--input", "x", "--output", "y", "--batch-size", "0"],
    ),
    ("plot_metrics", ("module", "retinanet_plugin.plot_metrics"), ["nope.json"]),
    (
        "export",
        ("path", "tools/export.py"),
        ["--config-file", TINY, "--format", "onnx", "--output", "/no/m.onnx"],
    ),
    ("analyze_dataset", ("path", "tools/analyze_dataset.py"), ["--config-file", "nope.yaml"]),
    ("train_net --debug", ("path", "train_net.py"), ["--config-file", "nope.yaml", "--debug"]),
]
# Runs each entry point as `python <file>` / `python -m <module>` would (runpy, __main__), in
# one process to pay the torch and detectron2 imports once; prints {name: [status, stderr]}.
_RUN_COMMAND_LINES = """
import contextlib, io, json, runpy, sys, traceback
results = {}
for name, (kind, target), argv in json.loads(sys.argv[1]):
    sys.argv = [target] + argv
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            if kind == "path":
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as e:
        status = e.code
    except BaseException:  # what Python would print and exit 1 for
        status = 1
        stderr.write(traceback.format_exc())
    results[name] = [status, stderr.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def command_lines():
    result = subprocess.run(
        [sys.executable, "-c", _RUN_COMMAND_LINES, json.dumps(COMMAND_LINES)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [c[0] for c in COMMAND_LINES if "--debug" not in c[2]])
def test_command_line_prints_one_error_line_and_exits_2(command_lines, name):
    status, stderr = command_lines[name]
    assert status == 2, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in stderr, stderr


def test_debug_flag_shows_the_traceback(command_lines):
    status, stderr = command_lines["train_net --debug"]
    assert status == 1
    assert "Traceback" in stderr and "ConfigError" in stderr


def test_options_after_the_overrides_are_options():
    """`KEY VALUE --resume`: --resume is the option, not an override missing its value."""
    import train_net

    args = cli.parse(
        train_net.argument_parser(),
        [
            "--config-file",
            TINY,
            "SOLVER.MAX_ITER",
            "3",
            "--resume",
            "--register-coco",
            "a",
            "b.json",
            "c",
            "MODEL.WEIGHTS",
            "w.pth",
            "--num-gpus=2",
        ],
    )
    assert args.resume and args.num_gpus == 2 and args.register_coco == [["a", "b.json", "c"]]
    assert args.opts == ["SOLVER.MAX_ITER", "3", "MODEL.WEIGHTS", "w.pth"]
