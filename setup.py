"""Installs the ``denseclip`` package from ``projects/DenseCLIP``.

Detectron2 is not listed: it is not published on the package registry under its own name.
``scripts/setup_env.sh`` installs it (or keeps one built from source); see README.md.
"""
from setuptools import find_packages, setup

setup(
    name="denseclip-detectron2",
    version="0.1.0",
    description="DenseCLIP (CVPR 2022) for object detection, instance and semantic segmentation on Detectron2",
    python_requires=">=3.10",
    package_dir={"": "projects/DenseCLIP"},
    packages=find_packages(where="projects/DenseCLIP"),
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "open_clip_torch>=2.20",
        "fvcore>=0.1.5,<0.1.6",
        "pycocotools>=2.0.2",
        "opencv-python",
        "safetensors",
    ],
    extras_require={
        # tools/deploy/export_model.py --format onnx, and running model.onnx
        "export": ["onnx>=1.16", "onnxruntime>=1.18"],
        "dev": ["pytest", "pytest-timeout", "onnx>=1.16", "onnxruntime>=1.18"],
        # demo/app.py, the browser demo (make demo-app)
        "demo": ["gradio==6.31.0"],
        # tests/test_app_browser.py and tools/app_screenshot.py drive the page in Chromium (make test-browser)
        "browser-test": ["selenium==4.51.0"],
    },
    entry_points={"console_scripts": ["denseclip-shapes=denseclip.data.datasets.shapes:main"]},
)
