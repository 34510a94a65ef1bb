"""Every bad input gets one line ``error: ...`` naming the file, key or value, exit status 2 and
no traceback, from every entry point, before any long work starts.

Each case runs the entry point's ``main`` in this process through
``retinanet_plugin.cli.defaults.run`` (the subprocess tests at the end check the real command
lines). The table in docs/reliability.md is generated from these cases:
:func:`test_readme_table_lists_every_case` fails when it is stale, and rewrites it when run with
``UPDATE_DOCS=1`` (``UPDATE_DOCS=1 pytest tests/test_bad_inputs.py``).
"""

import hashlib
import json
import os
import re
import subprocess
import sys
from typing import Dict

import bad_inputs_config
import bad_inputs_core
import bad_inputs_data
import bad_inputs_model
import bad_inputs_runs
import bad_inputs_tools
import bad_inputs_weights
import pytest
import torch
from bad_input_env import REPO, TINY, Env

import detectron2
import retinanet_plugin  # noqa: F401  (registers the plugin's components)
from conftest import isolated_process_state
from retinanet_plugin.cli import defaults as cli
from retinanet_plugin.cli.env import BUILD_RECORD

sys.path.insert(0, os.path.join(REPO, "tools"))
RELIABILITY_DOC = os.path.join(REPO, "docs", "reliability.md")
TABLE_START, TABLE_END = "<!-- bad-inputs -->", "<!-- /bad-inputs -->"

# Every case, area by area, in the order of the docs' table.
CASES = {}
for _area in (
    bad_inputs_core,
    bad_inputs_config,
    bad_inputs_data,
    bad_inputs_weights,
    bad_inputs_runs,
    bad_inputs_tools,
    bad_inputs_model,
):
    _clash = set(CASES) & set(_area.CASES)
    assert not _clash, f"case ids used twice: {_clash}"
    CASES.update(_area.CASES)


def _entry_main(entry: str):
    if entry == "train_net.py":
        from retinanet_plugin.cli import train

        return train.main
    if entry == "predict":
        from retinanet_plugin.cli import predict

        return predict.main
    if entry == "plot_metrics":
        from retinanet_plugin.cli import plot_metrics

        return plot_metrics.main
    import importlib

    return importlib.import_module(entry[: -len(".py")]).main  # tools/<entry>


@pytest.fixture(autouse=True)
def _no_state_left_behind():
    """Each case's message depends on the case alone (see conftest.isolated_process_state)."""
    with isolated_process_state():
        yield


def _content_digest(path: str) -> str:
    """SHA-256 over a file's bytes, or over a folder's file names and bytes (recursively)."""
    digest = hashlib.sha256()
    if os.path.isfile(path):
        with open(path, "rb") as f:
            digest.update(f.read())
        return digest.hexdigest()
    assert os.path.isdir(path), f"{path} does not exist before the command"
    for folder, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            file = os.path.join(folder, name)
            digest.update(os.path.relpath(file, path).encode() + b"\0")
            with open(file, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


# The message of each case, as the docs' table shows it (temporary paths replaced).
MESSAGES: Dict[str, str] = {}


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input_is_one_clear_line(case_id, tmp_path, shapes_dataset, capsys, monkeypatch):
    case = CASES[case_id]
    if case_id in ("predict-device", "cuda-without-gpu") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = Env(tmp_path, shapes_dataset, re.sub(r"\W", "_", case_id))
    argv = case.argv(env)
    kept = {path: _content_digest(path) for path in case.keep(env)}
    capsys.readouterr()
    # The program name argparse prints is the command's, not pytest's.
    monkeypatch.setattr(sys, "argv", [case.entry, *argv])
    status = cli.run(_entry_main(case.entry), argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2, err[-3000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    for fragment in case.expected:
        assert fragment in errors[0], errors[0]
    for path, digest in kept.items():
        assert _content_digest(path) == digest, f"{path} was changed"
    # As the docs show it: paths and process ids that differ between runs replaced.
    shapes = os.path.dirname(env.train_json)  # the generated dataset, made once per session
    message = errors[0].replace(str(tmp_path), "<tmp>").replace(shapes, "<shapes>")
    MESSAGES[case_id] = re.sub(r"\bprocess \d+", "process <pid>", message.replace(REPO, "<repo>"))


def render_table(messages: Dict[str, str]) -> str:
    rows = ["| command | bad input | message |", "|---|---|---|"]
    for case_id, case in CASES.items():
        message = messages.get(case_id, "(skipped on this machine)").replace("|", "\\|")
        rows.append(f"| `{case.entry}` | {case.what} | {message} |")
    return "\n".join(rows) + "\n"


def test_docs_table_lists_every_case():
    """docs/reliability.md's table shows every case with the message it produced in this run."""
    if not os.path.isfile(os.path.join(os.path.dirname(detectron2.__file__), BUILD_RECORD)):
        pytest.skip("the table shows the messages with detectron2 0.6 as make install builds it")
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
    from retinanet_plugin.cli import train

    args = cli.parse(
        train.argument_parser(),
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
