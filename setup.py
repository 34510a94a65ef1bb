#!/usr/bin/env python
"""retinanet_plugin: RetinaNet with focal loss (Lin et al. 2017) as a detectron2 plugin.

torch, torchvision and detectron2 are declared with lower bounds only: users bring their own
builds (detectron2 has no PyPI wheel; see tools/install_detectron2.py and the README).
The repository's configs/ ship inside the package (retinanet_plugin/configs links to them).
"""
from setuptools import find_packages, setup

setup(
    name="retinanet_plugin",
    version="0.1.0",
    description="RetinaNet with focal loss as a detectron2 plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["retinanet_plugin", "retinanet_plugin.*"]),
    # retinanet_plugin/configs is a symlink to the repository's configs/ (YAML and LazyConfig).
    package_data={"retinanet_plugin": ["configs/*.yaml", "configs/**/*.yaml", "configs/**/*.py"]},
    install_requires=[
        "torch>=1.10",
        "torchvision>=0.11",
        "detectron2>=0.6",
        "fvcore>=0.1.5",
        "iopath>=0.1.7",
        "pycocotools>=2.0.2",
        "numpy>=1.21",
        "Pillow>=8.0",
        "opencv-python-headless>=4.5",
        "matplotlib>=3.3",
        "tensorboard>=2.5",
        "PyYAML>=5.1",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout>=2"],
        # TEST.COCO_EVAL_BACKEND "faster_coco_eval"; without it evaluation uses pycocotools.
        "fast-eval": ["faster-coco-eval>=1.6"],
        # timm backbones (MODEL.BACKBONE.NAME build_retinanet_timm_*_backbone).
        "timm": ["timm>=1.0"],
        # ONNX export and running it (tools/export.py, retinanet_plugin.export); versions tested.
        "export": ["onnx>=1.23", "onnxruntime>=1.31"],
    },
    # The front ends as commands, with the options of train_net.py and the tools.
    entry_points={
        "console_scripts": [
            f"retinanet-{name.replace('_', '-')}=retinanet_plugin.cli.commands:{name}"
            for name in ("train", "predict", "export", "analyze_dataset", "plot_metrics")
        ]
    },
)
