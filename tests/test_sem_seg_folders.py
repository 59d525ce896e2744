"""Own semantic-segmentation data through DATASETS.SEM_SEG_FOLDERS.*: registration and its errors."""
import os

import cv2
import numpy as np
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from denseclip import get_denseclip_cfg, register_datasets_from_config
from denseclip.data import SemSegDatasetMapper


def write_folders(root, names, image_ext=".jpg"):
    """images/NAME.ext (16 x 24) and labels/NAME.png (0, 1 or 255) for each name; returns the two folders."""
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        cv2.imwrite(str(images / f"{name}{image_ext}"), np.full((16, 24, 3), 40 * i, np.uint8))
        label = np.zeros((16, 24), np.uint8)
        label[:, 12:] = 1
        label[0] = 255
        cv2.imwrite(str(labels / f"{name}.png"), label)
    return str(images), str(labels)


def folder_cfg(train=None, test=None, class_names=("sky", "road"), **extra):
    opts = ["MODEL.META_ARCHITECTURE", "SemanticSegmentor", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(len(class_names)),
            "DATASETS.SEM_SEG_FOLDERS.CLASS_NAMES", str(list(class_names))]
    for split, folders in (("TRAIN", train), ("TEST", test)):
        if folders:
            opts += [f"DATASETS.SEM_SEG_FOLDERS.{split}_IMAGES", folders[0], f"DATASETS.SEM_SEG_FOLDERS.{split}_LABELS", folders[1]]
    for key, value in extra.items():
        opts += [key, value]
    return get_denseclip_cfg("", opts)


@pytest.fixture
def clean_catalog():
    yield
    for name in ("sem_seg_folders_train", "sem_seg_folders_test"):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_folders_become_the_training_and_test_datasets(tmp_path, clean_catalog):
    train = write_folders(tmp_path / "train", ["b", "a", "c"])
    test = write_folders(tmp_path / "test", ["x"], image_ext=".png")
    cfg = folder_cfg(train, test)
    register_datasets_from_config(cfg)
    assert cfg.DATASETS.TRAIN == ("sem_seg_folders_train",) and cfg.DATASETS.TEST == ("sem_seg_folders_test",)
    records = DatasetCatalog.get("sem_seg_folders_train")
    pairs = [(os.path.basename(r["file_name"]), os.path.basename(r["sem_seg_file_name"])) for r in records]
    assert pairs == [("a.jpg", "a.png"), ("b.jpg", "b.png"), ("c.jpg", "c.png")]
    assert [os.path.basename(r["file_name"]) for r in DatasetCatalog.get("sem_seg_folders_test")] == ["x.png"]
    metadata = MetadataCatalog.get("sem_seg_folders_train")
    assert metadata.stuff_classes == ["sky", "road"] and metadata.ignore_label == 255
    assert metadata.evaluator_type == "sem_seg"
    out = SemSegDatasetMapper(cfg, is_train=False)(records[0])
    assert set(out["sem_seg"].unique().tolist()) == {0, 1, 255}


def test_nothing_set_registers_nothing(clean_catalog):
    cfg = get_denseclip_cfg()
    register_datasets_from_config(cfg)
    assert cfg.DATASETS.TRAIN == () and "sem_seg_folders_train" not in DatasetCatalog.list()


def test_errors_name_the_problem_and_the_fix(tmp_path, clean_catalog):
    train = write_folders(tmp_path / "train", ["a", "b"])

    with pytest.raises(FileNotFoundError, match="DATASETS.SEM_SEG_FOLDERS.TRAIN_LABELS: no such folder: .*missing"):
        register_datasets_from_config(folder_cfg((train[0], str(tmp_path / "missing"))))
    with pytest.raises(ValueError, match="Set both DATASETS.SEM_SEG_FOLDERS.TEST_IMAGES and .*TEST_LABELS"):
        register_datasets_from_config(folder_cfg(test=(train[0], "")))
    with pytest.raises(ValueError, match="CLASS_NAMES is empty: list the class names in the order of the label values"):
        register_datasets_from_config(folder_cfg(train, class_names=()))

    os.remove(os.path.join(train[1], "b.png"))
    with pytest.raises(ValueError, match=r"1 image\(s\) in .* have no label map .png .*: b\. Add their label maps"):
        register_datasets_from_config(folder_cfg(train))
    os.remove(os.path.join(train[0], "b.jpg"))
    cv2.imwrite(os.path.join(train[1], "orphan.png"), np.zeros((16, 24), np.uint8))
    with pytest.raises(ValueError, match=r"1 label map\(s\) in .* have no image .*: orphan\. Add the images"):
        register_datasets_from_config(folder_cfg(train))
    os.remove(os.path.join(train[1], "orphan.png"))
    cv2.imwrite(os.path.join(train[0], "c.png"), np.zeros((16, 24, 3), np.uint8))
    with pytest.raises(ValueError, match=r"mixes image types \(.jpg, .png\); convert them to one type"):
        register_datasets_from_config(folder_cfg(train))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="TRAIN_IMAGES: no images"):
        register_datasets_from_config(folder_cfg((str(empty), train[1])))


def test_label_value_out_of_range_is_refused_when_read(tmp_path, clean_catalog):
    """Label 2 with two class names: the mapper names the file, the value and the keys to fix."""
    train = write_folders(tmp_path / "train", ["a"])
    label = np.full((16, 24), 2, np.uint8)
    cv2.imwrite(os.path.join(train[1], "a.png"), label)
    cfg = folder_cfg(train)
    register_datasets_from_config(cfg)
    (record,) = DatasetCatalog.get("sem_seg_folders_train")
    with pytest.raises(ValueError, match=r"a.png has value\(s\) \[2\], outside the class indices 0..1"):
        SemSegDatasetMapper(cfg, is_train=True)(record)
