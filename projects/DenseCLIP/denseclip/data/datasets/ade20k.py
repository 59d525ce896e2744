"""
ADE20K (SceneParsing, ``ADEChallengeData2016``) for Detectron2's builtin ``ade20k_sem_seg_train`` /
``ade20k_sem_seg_val``.

Detectron2 registers them under ``$DETECTRON2_DATASETS/ADEChallengeData2016`` and reads

* images from ``images/{training,validation}/*.jpg``, as the download has them, and
* label maps from ``annotations_detectron2/{training,validation}/*.png``: 255 = ignored, k = class k,

while the download's ``annotations/{training,validation}/*.png`` hold 0 = "other" and k = class k - 1
(MMSegmentation reads them with ``reduce_zero_label``, which is the same mapping). :func:`prepare_ade20k`
writes the second from the first (0 -> 255, k -> k - 1); ``tools/prepare_ade20k.py`` is its command line.
:func:`check_ade20k_prepared` stops training and evaluation with that command when a raw download has not
been converted yet.
"""
import logging
import os
from typing import Dict, Iterable, Optional

import numpy as np
from PIL import Image

from detectron2.data import MetadataCatalog

__all__ = ["ADE20K_NUM_CLASSES", "ADE20K_SPLITS", "PREPARE_COMMAND", "check_ade20k_prepared", "prepare_ade20k"]

logger = logging.getLogger(__name__)

ADE20K_NUM_CLASSES = 150
ADE20K_SPLITS = ("training", "validation")
RAW_FOLDERS = [os.path.join(kind, split) for kind in ("images", "annotations") for split in ADE20K_SPLITS]
CONVERTED = "annotations_detectron2"
PREPARE_COMMAND = "python tools/prepare_ade20k.py"


def _describe(folder: str) -> str:
    entries = sorted(os.listdir(folder))
    if not entries:
        return "nothing (an empty folder)"
    shown = [e + ("/" if os.path.isdir(os.path.join(folder, e)) else "") for e in entries[:10]]
    return ", ".join(shown) + (f" and {len(entries) - 10} more" if len(entries) > 10 else "")


def _check_raw_layout(src: str) -> None:
    """Raises a ValueError saying what was expected and what ``src`` holds, unless it is ADEChallengeData2016."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"No such folder: {src}. Pass the ADEChallengeData2016 folder of the ADE20K download")
    missing = [f for f in RAW_FOLDERS if not os.path.isdir(os.path.join(src, f))]
    if not missing:
        return
    hint = ""
    if os.path.isdir(os.path.join(src, "ADEChallengeData2016")):
        hint = f" It holds ADEChallengeData2016/: pass {os.path.join(src, 'ADEChallengeData2016')} instead."
    raise ValueError(
        f"{src} is not the raw ADE20K layout (ADEChallengeData2016 as downloaded): expected the folders "
        f"{', '.join(f + '/' for f in RAW_FOLDERS)} (images/*/*.jpg; annotations/*/*.png with 0 = other, "
        f"k = class k-1), but {', '.join(f + '/' for f in missing)} {'is' if len(missing) == 1 else 'are'} "
        f"missing; found: {_describe(src)}.{hint}"
    )


def _convert(raw_file: str, out_file: str) -> None:
    with Image.open(raw_file) as f:
        raw = np.asarray(f)
    if raw.ndim != 2 or raw.dtype != np.uint8:
        raise ValueError(
            f"{raw_file} is not a raw ADE20K annotation: expected a single-channel 8-bit PNG of class indices, got "
            f"shape {raw.shape}, {raw.dtype}"
        )
    top = int(raw.max())
    if top > ADE20K_NUM_CLASSES:
        raise ValueError(
            f"{raw_file} has label {top}, above {ADE20K_NUM_CLASSES}: not a raw ADE20K annotation (0 = other, "
            f"1..{ADE20K_NUM_CLASSES} = classes). Restore the file from the download"
        )
    converted = raw - np.uint8(1)  # uint8 arithmetic: 0 (other) wraps to 255 (ignored), k to k - 1
    partial = out_file + ".partial"
    Image.fromarray(converted).save(partial, format="PNG")
    os.replace(partial, out_file)  # a file under its final name is always complete


def prepare_ade20k(src: str, dst: Optional[str] = None, progress: bool = True) -> Dict[str, Dict[str, int]]:
    """
    Convert the raw ADE20K annotations of ``src`` (``ADEChallengeData2016`` as downloaded) into the
    label maps Detectron2's ``ade20k_sem_seg_*`` read: ``dst/annotations_detectron2/{training,validation}/
    NAME.png``, 0 (other) -> 255 (ignored), k -> k - 1. ``dst`` defaults to ``src`` (the downloaded folder
    then serves as ``$DETECTRON2_DATASETS/ADEChallengeData2016``); another ``dst`` gets ``dst/images``, a
    symbolic link to ``src/images``, since Detectron2 reads the images next to the label maps.

    Idempotent: a label map already written is skipped (files are written under a temporary name and
    renamed, so an interrupted run leaves no half-written map). Shows a tqdm progress bar per split when
    ``progress``. Returns ``{split: {"converted": n, "skipped": m}}``. A folder that is not the raw layout
    is refused with what was expected and what was found.
    """
    from tqdm import tqdm

    src = os.path.abspath(os.path.expanduser(src))
    dst = os.path.abspath(os.path.expanduser(dst)) if dst else src
    _check_raw_layout(src)
    if dst != src:
        os.makedirs(dst, exist_ok=True)
        images = os.path.join(dst, "images")
        if not os.path.lexists(images):
            os.symlink(os.path.join(src, "images"), images, target_is_directory=True)
            logger.info(f"Linked {images} -> {os.path.join(src, 'images')}")
    counts = {}
    for split in ADE20K_SPLITS:
        raw_dir, out_dir = os.path.join(src, "annotations", split), os.path.join(dst, CONVERTED, split)
        os.makedirs(out_dir, exist_ok=True)
        names = sorted(f for f in os.listdir(raw_dir) if f.endswith(".png"))
        if not names:
            raise ValueError(f"{raw_dir} holds no .png annotations; found: {_describe(raw_dir)}")
        todo = [n for n in names if not os.path.exists(os.path.join(out_dir, n))]
        for name in tqdm(todo, desc=f"ADE20K {split}", unit="map", disable=not progress or not todo):
            _convert(os.path.join(raw_dir, name), os.path.join(out_dir, name))
        counts[split] = {"converted": len(todo), "skipped": len(names) - len(todo)}
    return counts


def _pngs(folder: str) -> set:
    return {f for f in os.listdir(folder) if f.endswith(".png")}


def check_ade20k_prepared(dataset_names: Iterable[str]) -> None:
    """
    For each of Detectron2's ``ade20k_sem_seg_*`` datasets in ``dataset_names`` (others are ignored): if
    its label-map folder (``.../ADEChallengeData2016/annotations_detectron2/<split>``) does not exist but
    the raw download's ``annotations/<split>`` does, or holds fewer maps than it, raise a
    FileNotFoundError that names the command converting it (``tools/prepare_ade20k.py``), instead of the
    loader's bare one. A dataset found
    nowhere is left to the loader (tools that only read its metadata do not need the files).
    """
    for name in dataset_names:
        if not name.startswith("ade20k_sem_seg_") or name not in MetadataCatalog.list():
            continue
        label_dir = MetadataCatalog.get(name).get("sem_seg_root")
        if not label_dir:
            continue
        root, split = os.path.dirname(os.path.dirname(label_dir)), os.path.basename(label_dir)
        raw_dir = os.path.join(root, "annotations", split)
        if not os.path.isdir(raw_dir):
            continue
        if not os.path.isdir(label_dir):
            raise FileNotFoundError(
                f"Dataset {name} reads its label maps from {label_dir}, which does not exist, but {raw_dir} holds "
                f"ADE20K's raw annotations (0 = other, k = class k-1). Convert them once (0 -> 255 ignored, "
                f"k -> k-1) with:\n  {PREPARE_COMMAND} {root}"
            )
        missing = _pngs(raw_dir) - _pngs(label_dir)
        if missing:
            raise FileNotFoundError(
                f"Dataset {name}: {len(missing)} of the raw annotations in {raw_dir} have no converted label map in "
                f"{label_dir} (e.g. {sorted(missing)[0]}; an interrupted conversion?). Finish it (converted files "
                f"are skipped) with:\n  {PREPARE_COMMAND} {root}"
            )
