"""`python -m retinanet_plugin.env` reports detectron2's version, its native ops and build."""

import importlib.util
import json
import os

import detectron2
from retinanet_plugin.cli import env


def test_env_reports_detectron2_its_native_ops_and_its_build(capsys):
    assert env.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    detectron2_line = next(line for line in lines if line.startswith("detectron2 "))
    assert detectron2.__version__ in detectron2_line
    native_line = next(line for line in lines if line.startswith("detectron2 native ops"))
    native = importlib.util.find_spec("detectron2._C") is not None
    assert ("present" if native else "absent") in native_line
    assert any("PyTorch" in line for line in lines)  # detectron2's own collect_env table
    record = os.path.join(os.path.dirname(detectron2.__file__), env.BUILD_RECORD)
    fixes = [line for line in lines if line.startswith("detectron2 source fix")]
    if os.path.isfile(record):  # built by tools/install_detectron2.py: every fix is listed
        with open(record) as f:
            listed = json.load(f)["fixes"]
        assert len(fixes) == len(listed) and all(fix in " ".join(fixes) for fix in listed)
    else:
        assert not fixes
