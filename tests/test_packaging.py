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
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*pip_wheel, "-w", str(tmp_path / "dist"), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("retinanet_plugin-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"retinanet_plugin/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    expected |= {  # the LazyConfigs
        f"retinanet_plugin/configs/{p.relative_to(REPO / 'configs')}"
        for p in (REPO / "configs" / "lazy").rglob("*.py")
    }
    assert expected and expected <= names
    assert "retinanet_plugin/modeling/meta_arch.py" in names
    # The console commands of `pip install .`, each a front end that runs (--help).
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    commands = dict(
        line.replace(" ", "").split("=", 1)
        for line in zipfile.ZipFile(wheel).read(entry_points).decode().splitlines()
        if "=" in line
    )
    assert sorted(commands) == [
        "retinanet-analyze-dataset",
        "retinanet-export",
        "retinanet-plot-metrics",
        "retinanet-predict",
        "retinanet-train",
    ]
    for command, target in commands.items():
        module, function = target.split(":")
        code = f"import sys, {module} as m; sys.argv = ['{command}', '--help']; m.{function}()"
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.startswith(f"usage: {command}"), done.stdout[:200]


def test_components_are_registered():
    import retinanet_plugin  # noqa: F401
    from detectron2.modeling import META_ARCH_REGISTRY
    from detectron2.modeling.anchor_generator import ANCHOR_GENERATOR_REGISTRY
    from retinanet_plugin import RETINANET_HEAD_REGISTRY

    assert (
        META_ARCH_REGISTRY.get("FocalLossRetinaNet").__module__
        == "retinanet_plugin.modeling.meta_arch"
    )
    assert ANCHOR_GENERATOR_REGISTRY.get("RetinaNetAnchorGenerator").__module__.startswith(
        "retinanet_plugin"
    )
    assert (
        RETINANET_HEAD_REGISTRY.get("FocalLossHead").__module__ == "retinanet_plugin.modeling.head"
    )
    # detectron2's own RetinaNet stays registered under its name.
    assert META_ARCH_REGISTRY.get("RetinaNet").__module__.startswith("detectron2")


BACKPORTED_KEYS = ("DATALOADER.REPEAT_SQRT",)


def test_docs_list_every_config_key_the_plugin_adds_with_its_default():
    """docs/configs.md's table has a row per added key, default included."""
    import re

    from detectron2.config import get_cfg
    from retinanet_plugin import add_retinanet_config

    def flat(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from flat(value, f"{prefix}{key}.")
            else:  # a value, or an open section empty by default (MODEL.TIMM.MODEL_ARGS)
                yield f"{prefix}{key}", dict(value) if isinstance(value, dict) else value

    plugin = get_cfg()
    add_retinanet_config(plugin)
    added = dict(flat(plugin))
    detectron2_keys = dict(flat(get_cfg()))
    for key in detectron2_keys:
        added.pop(key)
    # Keys of upstream main the plugin adds only where the installed detectron2 lacks them.
    for key in BACKPORTED_KEYS:
        added.setdefault(key, detectron2_keys.get(key))
    configs_doc = (REPO / "docs" / "configs.md").read_text()
    section = configs_doc.split("## Every config key", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([A-Z0-9_.]+)` \| `([^`]*)` \|", section, re.M))
    assert sorted(set(added) - set(rows)) == []
    assert sorted(set(rows) - set(added)) == []
    for key, default in added.items():
        shown = repr(default) if isinstance(default, str) else str(default)
        assert rows[key].replace("'", '"') == shown.replace("'", '"'), key


def _plugin_import_graph():
    """{module: plugin modules it imports at module level}, from the source (ast)."""
    import ast

    package = REPO / "retinanet_plugin"
    files = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for p in package.rglob("*.py")
    }

    def imported(module, node):
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        here = module if files[module].name == "__init__.py" else module.rsplit(".", 1)[0]
        base = here.split(".")[: len(here.split(".")) - node.level + 1] if node.level else []
        target = ".".join(base + ([node.module] if node.module else []))
        return [target] + [f"{target}.{alias.name}" for alias in node.names]

    graph = {}
    for module, path in files.items():
        statements = ast.parse(path.read_text()).body
        statements += [s for t in statements if isinstance(t, ast.Try) for s in t.body]
        graph[module] = {
            name
            for node in statements
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for name in imported(module, node)
            if name in files and name != module
        }
    return graph


def test_no_import_cycle_between_plugin_modules():
    graph = _plugin_import_graph()
    assert graph["retinanet_plugin.modeling.meta_arch"] >= {
        "retinanet_plugin.modeling.postprocessing"
    }
    state = {}  # module -> "visiting" / "done"

    def visit(module, path):
        state[module] = "visiting"
        for dependency in sorted(graph[module]):
            assert state.get(dependency) != "visiting", " -> ".join(path + [dependency])
            if dependency not in state:
                visit(dependency, path + [dependency])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


# The package's layers, lowest first: a module imports (at module level) only modules of its
# own layer or lower ones, so that e.g. validating a config needs none of the model's code.
LAYERS = [
    {"errors"},
    {"compat"},
    {"config"},
    {"data", "modeling"},
    {"checkpoint", "evaluation"},
    {"engine", "export"},
    {"cli"},
    {"", "predict", "plot_metrics", "env"},  # the package itself, `python -m` shortcuts
]


def test_layers_import_only_lower_layers():
    def layer(module):
        area = (module.split(".") + [""])[1]
        return next(i for i, areas in enumerate(LAYERS) if area in areas)

    graph = _plugin_import_graph()
    upward = sorted(
        f"{module} -> {dependency}"
        for module, dependencies in graph.items()
        for dependency in dependencies
        # The package itself is imported before any of its modules.
        if dependency != "retinanet_plugin" and layer(dependency) > layer(module)
    )
    assert upward == []
    assert graph["retinanet_plugin.config.validation"] >= {"retinanet_plugin.config.option_rules"}


def test_readme_python_quick_start_runs(capsys):
    """The README's Python quick start runs as written and prints detections."""
    readme = (REPO / "README.md").read_text()
    snippet = readme.split("From Python, as any detectron2 model:", 1)[1]
    code = snippet.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(code, "README.md quick start", "exec"), namespace)
    instances = namespace["instances"]
    assert type(namespace["model"]).__name__ == "FocalLossRetinaNet"
    assert instances.image_size == (192, 256)
    assert len(instances.scores) == len(instances.pred_classes) <= 100
    assert "Boxes(tensor(" in capsys.readouterr().out


def test_import_paths_users_may_have_written_still_work():
    """The paths of the flat layout users wrote in their code keep working after the move into
    layers: config keys, the checkpointer, and the ``python -m`` commands."""
    from retinanet_plugin.checkpoint import RetinaNetCheckpointer
    from retinanet_plugin.checkpoint.checkpointer import RetinaNetCheckpointer as moved
    from retinanet_plugin.config import add_retinanet_config
    from retinanet_plugin.config.defaults import add_retinanet_config as moved_config

    assert RetinaNetCheckpointer is moved and add_retinanet_config is moved_config
    for module in ("retinanet_plugin.predict", "retinanet_plugin.plot_metrics"):
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO
        )
        assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-2000:]
