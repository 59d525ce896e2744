"""Install Detectron2 from the sal-detectron2 wheel: extract only its detectron2/ package into this
interpreter's site-packages (not the wheel's stray top-level tools/, and not its _C extension, which
is built for CPython 3.10 only; torchvision provides the ops this project uses).

    python scripts/extract_detectron2.py sal_detectron2-0.7.2-cp310-none-any.whl
"""
import sys
import sysconfig
import zipfile

site = sysconfig.get_paths()["purelib"]
with zipfile.ZipFile(sys.argv[1]) as wheel:
    members = [
        name for name in wheel.namelist()
        if name.startswith("detectron2/") and not name.split("/")[-1].startswith("_C.")
    ]
    wheel.extractall(site, members)
print(f"[setup] extracted {len(members)} files of detectron2/ into {site}")
