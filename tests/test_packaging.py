"""The package builds as a wheel that carries the configs and registers its components."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_configs_as_package_data(tmp_path):
    # Build from a copy: setuptools writes build/ next to setup.py.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, source)
    for name in ("retinanet_plugin", "configs"):  # retinanet_plugin/configs links to ../configs
        shutil.copytree(REPO / name, source / name, symlinks=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("retinanet_plugin-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"retinanet_plugin/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert expected and expected <= names
    assert "retinanet_plugin/meta_arch.py" in names


def test_components_are_registered():
    import retinanet_plugin  # noqa: F401
    from detectron2.modeling import META_ARCH_REGISTRY
    from detectron2.modeling.anchor_generator import ANCHOR_GENERATOR_REGISTRY
    from retinanet_plugin import RETINANET_HEAD_REGISTRY

    assert META_ARCH_REGISTRY.get("FocalLossRetinaNet").__module__ == "retinanet_plugin.meta_arch"
    assert ANCHOR_GENERATOR_REGISTRY.get("RetinaNetAnchorGenerator").__module__.startswith(
        "retinanet_plugin"
    )
    assert RETINANET_HEAD_REGISTRY.get("FocalLossHead").__module__ == "retinanet_plugin.head"
    # detectron2's own RetinaNet stays registered under its name.
    assert META_ARCH_REGISTRY.get("RetinaNet").__module__.startswith("detectron2")


def test_readme_lists_every_config_key_the_plugin_adds_with_its_default():
    """The README's "Configs and options" table has a row per added key, default included."""
    import os
    import re

    from detectron2.config import get_cfg
    from retinanet_plugin import add_retinanet_config

    def flat(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    plugin = get_cfg()
    add_retinanet_config(plugin)
    added = dict(flat(plugin))
    for key in dict(flat(get_cfg())):
        added.pop(key)
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme.split("## Configs and options", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([A-Z0-9_.]+)` \| `([^`]*)` \|", section, re.M))
    assert sorted(set(added) - set(rows)) == []
    assert sorted(set(rows) - set(added)) == []
    for key, default in added.items():
        shown = repr(default) if isinstance(default, str) else str(default)
        assert rows[key].replace("'", '"') == shown.replace("'", '"'), key
