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
the fast COCO-eval path). RetinaNet needs none of them; ``retinanet_plugin.compat`` makes the
missing extension raise a clear error if anything calls it and routes COCO evaluation through
pycocotools.

If ``import detectron2`` already works (for example a user's own build of upstream detectron2
with its CUDA ops), nothing is changed.

Usage: ``python tools/install_detectron2.py [--force]`` with the Python of the target environment.
pip needs torch already installed: pip runs the sdist's setup.py to read its metadata, and that
setup.py imports torch. ``--wheel-dir DIR`` only builds the wheel into DIR (to carry to an offline
machine; being pure Python, it installs on any Python >= 3.8).
"""
import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from pathlib import Path

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
# (black, pydot and future served the caffe2 exporter and config pretty-printing; hydra-core only
# the lazy-config `instantiate` of .py configs.)
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
                description="detectron2 {WHEEL_VERSION} Python code, no native ops",
                packages=find_packages(include=["detectron2", "detectron2.*"]) + {packages[1:]!r},
                package_dir={package_dir!r},
                package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
                python_requires=">=3.8",
                install_requires={INSTALL_REQUIRES!r},
            )
            """
        )
    )
    (source_root / "setup.cfg").unlink(missing_ok=True)
    return source_root


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if detectron2 imports")
    parser.add_argument("--wheel-dir", help="build the wheel into this folder; do not install")
    args = parser.parse_args()
    if args.wheel_dir and not os.path.isdir(args.wheel_dir):
        sys.exit(f"error: --wheel-dir {args.wheel_dir}: not a folder; create it first")
    if importlib.util.find_spec("detectron2") is not None and not (args.force or args.wheel_dir):
        import detectron2

        print(
            f"detectron2 {detectron2.__version__} already installed at "
            f"{Path(detectron2.__file__).parent}; keeping it"
        )
        return
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
