#!/usr/bin/env python
"""Install detectron2 into the current Python environment when it is not importable.

Why this exists: detectron2 publishes no wheels on PyPI, and building it from source needs its
C++/CUDA sources and a GitHub checkout, neither of which is reachable from every machine. PyPI
does carry ``pb1-detectron2==0.6``, a source package holding upstream detectron2 v0.6's Python
code unchanged but without the native-op sources, so its own setup.py cannot build.

This script downloads that package with pip, checks its sha256 against a pinned value (and
refuses to go on if it differs), and builds + installs a pure-Python wheel named ``detectron2``
version ``0.6`` from its ``detectron2/`` package, the model-zoo configs and the three projects
detectron2 ships as ``detectron2.projects.*`` (PointRend, DeepLab, Panoptic-DeepLab).

What this build lacks is detectron2's ``_C`` extension (rotated boxes, deformable convolution,
the fast COCO-eval path). RetinaNet needs none of them. Before building, the script applies
:data:`SOURCE_FIXES` to the sources: small edits, each the way upstream later fixed it, for what
current Python, numpy and Pillow broke in 0.6 and for the missing extension (its ops raise a
clear error when called; COCO evaluation falls back to pycocotools). So the installed detectron2
works on its own, without the plugin. The wheel records the fixes in
``detectron2/PURE_PYTHON_BUILD.json``.

If ``import detectron2`` already works (for example a user's own build of upstream detectron2
with its CUDA ops), nothing is changed; a build of this script with other fixes is rebuilt.

Usage: ``python tools/install_detectron2.py [--force]`` with the Python of the target environment.
pip needs torch already installed: pip runs the sdist's setup.py to read its metadata, and that
setup.py imports torch. ``--wheel-dir DIR`` only builds the wheel into DIR (to carry to an offline
machine; being pure Python, it installs on any Python >= 3.8).
"""
import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from pathlib import Path
from typing import Callable, List, NamedTuple

SDIST_REQUIREMENT = "pb1-detectron2==0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
WHEEL_VERSION = "0.6"
# detectron2 0.6's own setup.py maps these projects into the detectron2 namespace.
PROJECTS = {
    "point_rend": "PointRend",
    "deeplab": "DeepLab",
    "panoptic_deeplab": "Panoptic-DeepLab",
}
# Runtime requirements of detectron2 0.6's setup.py that its Python code needs at import time.
# (black, pydot and future served the caffe2 exporter and config pretty-printing; hydra-core, the
# overrides of LazyConfig .py configs, is pinned in requirements.txt.)
INSTALL_REQUIRES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
]
# Written into the built package: where it came from and which fixes it has.
BUILD_RECORD = "PURE_PYTHON_BUILD.json"
# The wheel's summary, also how a build of an earlier version of this script (which wrote no
# record) is recognized.
WHEEL_SUMMARY = f"detectron2 {WHEEL_VERSION} Python code, no native ops"
# Module that stands in for the missing extension in the layers that import it at module level.
MISSING_NATIVE_OPS = '''"""Stand-in for detectron2's C++/CUDA extension ``detectron2._C`` in a build
without it (retinanet_plugin's tools/install_detectron2.py): its ops raise a clear error."""


class MissingNativeOpError(RuntimeError):
    """A detectron2 native op was called in a build that has none."""


class _MissingNativeOps:
    def __getattr__(self, name):
        raise MissingNativeOpError(
            f"detectron2._C.{name}: this detectron2 was installed without its C++/CUDA extension "
            "(pure Python build). To use this op, build detectron2 from source with its native "
            "ops: https://detectron2.readthedocs.io/en/latest/tutorials/install.html"
        )


_C = _MissingNativeOps()
'''


class SourceFix(NamedTuple):
    """One edit of detectron2's sources before the build."""

    what: str  # what it fixes, recorded in the wheel
    files: List[str]  # paths under detectron2/ it edits ("*" = every .py file)
    edit: Callable[[str], str]  # source text -> fixed text


def _replace(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        return text.replace(old, new)

    return edit


def _substitute(pattern: str, repl: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        return re.sub(pattern, repl, text)

    return edit


_IMPORT_C = "from detectron2 import _C\n"
SOURCE_FIXES = [
    SourceFix(
        "PIL.Image.LINEAR (removed in Pillow 10) -> PIL.Image.BILINEAR, the same filter "
        "(upstream ff53992b)",
        ["data/transforms/transform.py"],
        _replace("Image.LINEAR", "Image.BILINEAR"),
    ),
    SourceFix(
        "np.int/np.float/np.bool/np.str/np.object (removed in numpy 2) -> the builtins "
        "(upstream 027099d3, 654570a2)",
        ["*"],
        _substitute(r"\bnp\.(int|float|bool|str|object)\b", r"\1"),
    ),
    SourceFix(
        "VOC split file with a single id: np.loadtxt(ndmin=1) keeps it a list",
        ["data/datasets/pascal_voc.py"],
        _replace("np.loadtxt(f, dtype=str)", "np.loadtxt(f, dtype=str, ndmin=1)"),
    ),
    SourceFix(
        "layers importing detectron2._C at module level import without it; its ops raise "
        "MissingNativeOpError (upstream 710e7795 made them lazy)",
        ["layers/deform_conv.py", "layers/roi_align_rotated.py", "layers/rotated_boxes.py"],
        _replace(
            _IMPORT_C,
            "try:\n    " + _IMPORT_C + "except ImportError:  # built without native ops\n"
            "    from detectron2._missing_native_ops import _C\n",
        ),
    ),
    SourceFix(
        "COCOEvaluator falls back to pycocotools' COCOeval without the native fast path "
        "(upstream 710e7795)",
        ["evaluation/coco_evaluation.py"],
        _replace(
            "from detectron2.evaluation.fast_eval_api import COCOeval_opt\n",
            "try:\n    from detectron2.evaluation.fast_eval_api import COCOeval_opt\n"
            "except ImportError:  # built without native ops\n    COCOeval_opt = COCOeval\n",
        ),
    ),
    SourceFix(
        "detectron2.export imports without caffe2 (TracingAdapter, scripting_with_instances); "
        "its caffe2 exporter only where caffe2 is installed (upstream d29378aa)",
        ["export/__init__.py"],
        _replace(
            "from .api import *\n",
            "try:\n    from caffe2.proto import caffe2_pb2 as _tmp  # noqa: F401\n"
            "except ImportError:  # caffe2 is optional\n    pass\nelse:\n    from .api import *\n",
        ),
    ),
    SourceFix(
        "MapDataset's retry samples from a list, not a set (random.sample, Python >= 3.11; "
        "upstream 400a49c1)",
        ["data/common.py"],
        _replace(
            "self._rng.sample(self._fallback_candidates, k=1)",
            "self._rng.sample(list(self._fallback_candidates), k=1)",
        ),
    ),
]


def apply_source_fixes(package: Path) -> List[str]:
    """Applies :data:`SOURCE_FIXES` to the detectron2 package folder ``package``, adds the
    native-op stand-in module and the build record; returns the fixes' descriptions.

    Raises:
        SystemExit: a fix changed nothing (the sources are not the pinned 0.6).
    """
    all_files = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py"))
    for fix in SOURCE_FIXES:
        changed = 0
        for relative in all_files if fix.files == ["*"] else fix.files:
            path = package / relative
            text = path.read_text(encoding="utf-8")
            fixed = fix.edit(text)
            if fixed != text:
                path.write_text(fixed, encoding="utf-8")
                changed += 1
        if changed < (1 if fix.files == ["*"] else len(fix.files)):
            sys.exit(f"error: the fix '{fix.what}' did not apply to {SDIST_REQUIREMENT}'s sources")
    (package / "_missing_native_ops.py").write_text(MISSING_NATIVE_OPS, encoding="utf-8")
    fixes = [fix.what for fix in SOURCE_FIXES]
    record = {"source": SDIST_REQUIREMENT, "sha256": SDIST_SHA256, "fixes": fixes}
    (package / BUILD_RECORD).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return fixes


def run(cmd):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sdist(workdir: Path) -> Path:
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-build-isolation",
            "-d",
            workdir,
            SDIST_REQUIREMENT,
        ]
    )
    sdists = sorted(workdir.glob("pb1[-_]detectron2-*.tar.gz"))
    if len(sdists) != 1:
        sys.exit(f"expected one pb1-detectron2 source archive in {workdir}, found {sdists}")
    actual = sha256_of(sdists[0])
    if actual != SDIST_SHA256:
        sys.exit(
            f"refusing to install: {sdists[0].name} has sha256 {actual}, "
            f"expected {SDIST_SHA256} (the package on the index changed or was tampered with)"
        )
    print(f"sha256 ok: {sdists[0].name}", flush=True)
    return sdists[0]


def write_wheel_project(sdist: Path, project_dir: Path) -> None:
    with tarfile.open(sdist) as tar:
        tar.extractall(project_dir, filter="data")
    (source_root,) = [p for p in project_dir.iterdir() if p.is_dir()]
    for what in apply_source_fixes(source_root / "detectron2"):
        print(f"fixed: {what}", flush=True)
    package_dir = {"": "."}
    packages = ["detectron2"]
    for module, folder in PROJECTS.items():
        package_dir[f"detectron2.projects.{module}"] = f"projects/{folder}/{module}"
        packages.append(f"detectron2.projects.{module}")
    (source_root / "setup.py").write_text(
        textwrap.dedent(
            f"""\
            from setuptools import find_packages, setup

            setup(
                name="detectron2",
                version={WHEEL_VERSION!r},
                description={WHEEL_SUMMARY!r},
                packages=find_packages(include=["detectron2", "detectron2.*"]) + {packages[1:]!r},
                package_dir={package_dir!r},
                package_data={{
                    "detectron2": [{BUILD_RECORD!r}],
                    "detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"],
                }},
                python_requires=">=3.8",
                install_requires={INSTALL_REQUIRES!r},
            )
            """
        )
    )
    (source_root / "setup.cfg").unlink(missing_ok=True)
    return source_root


def outdated_build(package: Path) -> str:
    """Why the detectron2 installed in ``package`` is a build of this script without today's
    fixes ("" if it is today's build, or not this script's build at all: a user's own detectron2
    is kept)."""
    record = package / BUILD_RECORD
    if record.is_file():
        fixes = json.loads(record.read_text(encoding="utf-8")).get("fixes")
        return "" if fixes == [fix.what for fix in SOURCE_FIXES] else "its source fixes differ"
    try:
        from importlib.metadata import PackageNotFoundError, metadata

        summary = metadata("detectron2").get("Summary")
    except (ImportError, PackageNotFoundError):
        return ""
    return (
        "an earlier build of this script, without source fixes" if summary == WHEEL_SUMMARY else ""
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if detectron2 imports")
    parser.add_argument("--wheel-dir", help="build the wheel into this folder; do not install")
    args = parser.parse_args()
    if args.wheel_dir and not os.path.isdir(args.wheel_dir):
        sys.exit(f"error: --wheel-dir {args.wheel_dir}: not a folder; create it first")
    installed = importlib.util.find_spec("detectron2")
    if installed is not None and not (args.force or args.wheel_dir):
        package = Path(installed.origin).parent
        outdated = outdated_build(package)
        if not outdated:
            print(f"detectron2 already installed at {package}; keeping it")
            return
        print(f"rebuilding detectron2 at {package}: {outdated}", flush=True)
    if importlib.util.find_spec("torch") is None:
        sys.exit(
            "install torch first: pip reads pb1-detectron2's metadata by running its "
            "setup.py, which imports torch"
        )
    with tempfile.TemporaryDirectory(prefix="detectron2-build-") as tmp:
        tmp = Path(tmp)
        sdist = download_sdist(tmp / "download")
        source_root = write_wheel_project(sdist, tmp / "src")
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                tmp / "dist",
                source_root,
            ]
        )
        (wheel,) = (tmp / "dist").glob("detectron2-*.whl")
        if args.wheel_dir:
            target = Path(args.wheel_dir) / wheel.name
            if target.exists():
                sys.exit(f"error: {target} exists; remove it to build it again")
            shutil.copy(wheel, target)
            print(f"wrote {target}")
            return
        run([sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps", wheel])
    print("detectron2 installed (pure Python, no native ops)")


if __name__ == "__main__":
    main()
