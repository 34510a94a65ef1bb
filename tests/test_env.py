"""`python -m retinanet_plugin.env` reports detectron2's version and its native-op status."""
import subprocess
import sys

import detectron2
from retinanet_plugin import compat


def test_env_reports_detectron2_and_native_ops():
    result = subprocess.run(
        [sys.executable, "-m", "retinanet_plugin.env"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    detectron2_line = next(line for line in lines if line.startswith("detectron2 "))
    assert detectron2.__version__ in detectron2_line
    native_line = next(line for line in lines if line.startswith("detectron2 native ops"))
    # "absent" with the pure-Python build of tools/install_detectron2.py.
    assert ("present" if compat.NATIVE_OPS_ERROR is None else "absent") in native_line
    assert any("PyTorch" in line for line in lines)  # detectron2's own collect_env table
