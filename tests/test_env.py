"""`python -m retinanet_plugin.env` reports detectron2's version and its native-op status."""

import detectron2
from retinanet_plugin import compat, env


def test_env_reports_detectron2_and_native_ops(capsys):
    assert env.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    detectron2_line = next(line for line in lines if line.startswith("detectron2 "))
    assert detectron2.__version__ in detectron2_line
    native_line = next(line for line in lines if line.startswith("detectron2 native ops"))
    # "absent" with the pure-Python build of tools/install_detectron2.py.
    assert ("present" if compat.NATIVE_OPS_ERROR is None else "absent") in native_line
    assert any("PyTorch" in line for line in lines)  # detectron2's own collect_env table
    patches = [line for line in lines if line.startswith("compat patch")]
    assert len(patches) == max(1, len(compat.APPLIED))
