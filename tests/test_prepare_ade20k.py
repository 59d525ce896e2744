"""ADE20K preparation (tools/prepare_ade20k.py, denseclip.data.datasets.prepare_ade20k) on a generated
folder in the download's layout, and the stop with that command when a raw download is not converted."""
import os

import numpy as np
import pytest
from PIL import Image

from detectron2.data import MetadataCatalog
from detectron2.data.datasets import load_sem_seg

from denseclip import get_denseclip_cfg, register_datasets_from_config
from denseclip.data.datasets import check_ade20k_prepared, prepare_ade20k

from helpers import REPO, load_script, run_script

# Raw ADE20K values (0 = other, k = class k - 1) and what Detectron2's ade20k_sem_seg_* must read.
RAW = np.array([[0, 1, 150, 37], [2, 0, 149, 1], [150, 150, 0, 3]], np.uint8)
CONVERTED = np.array([[255, 0, 149, 36], [1, 255, 148, 0], [149, 149, 255, 2]], np.uint8)
ADE20K_CONFIG = "configs/ADE20K-SemanticSegmentation/semantic_fpn_clip_R_50_512x512_80k.yaml"
NAMES = {"training": ["ADE_train_00000001", "ADE_train_00000002"], "validation": ["ADE_val_00000001"]}


def write_raw(root):
    """root/ADEChallengeData2016 in the download's layout: images/<split>/*.jpg, annotations/<split>/*.png."""
    src = root / "ADEChallengeData2016"
    for split, names in NAMES.items():
        (src / "images" / split).mkdir(parents=True)
        (src / "annotations" / split).mkdir(parents=True)
        for i, name in enumerate(names):
            Image.fromarray(np.full((3, 4, 3), 60 * i, np.uint8)).save(src / "images" / split / f"{name}.jpg")
            Image.fromarray(np.roll(RAW, i, axis=1)).save(src / "annotations" / split / f"{name}.png")
    return src


def read(path):
    with Image.open(path) as f:
        return f.mode, np.asarray(f)


def test_converts_0_to_255_and_k_to_k_minus_1(tmp_path):
    src = write_raw(tmp_path)
    counts = prepare_ade20k(str(src), progress=False)
    assert counts == {"training": {"converted": 2, "skipped": 0}, "validation": {"converted": 1, "skipped": 0}}
    for split, names in NAMES.items():
        for i, name in enumerate(names):
            mode, labels = read(src / "annotations_detectron2" / split / f"{name}.png")
            assert mode == "L" and labels.dtype == np.uint8
            assert np.array_equal(labels, np.roll(CONVERTED, i, axis=1))
    assert not list(src.rglob("*.partial"))
    # The layout Detectron2's builtin registration reads, relative to $DETECTRON2_DATASETS/ADEChallengeData2016.
    meta = MetadataCatalog.get("ade20k_sem_seg_val")
    assert meta.image_root.endswith(os.path.join("ADEChallengeData2016", "images", "validation"))
    assert meta.sem_seg_root.endswith(os.path.join("ADEChallengeData2016", "annotations_detectron2", "validation"))
    records = load_sem_seg(str(src / "annotations_detectron2" / "training"), str(src / "images" / "training"),
                           gt_ext="png", image_ext="jpg")
    assert [os.path.basename(r["file_name"]) for r in records] == [f"{n}.jpg" for n in NAMES["training"]]


def test_second_run_skips_what_is_converted(tmp_path):
    src = write_raw(tmp_path)
    prepare_ade20k(str(src), progress=False)
    out = src / "annotations_detectron2" / "training" / f"{NAMES['training'][0]}.png"
    stamp = out.stat().st_mtime_ns
    assert prepare_ade20k(str(src), progress=False) == {
        "training": {"converted": 0, "skipped": 2}, "validation": {"converted": 0, "skipped": 1}}
    assert out.stat().st_mtime_ns == stamp
    out.unlink()  # an interrupted run: only the missing map is written
    assert prepare_ade20k(str(src), progress=False)["training"] == {"converted": 1, "skipped": 1}
    assert np.array_equal(read(out)[1], CONVERTED)


def test_another_destination_links_the_images(tmp_path):
    src = write_raw(tmp_path / "download")
    dst = tmp_path / "datasets" / "ADEChallengeData2016"
    prepare_ade20k(str(src), str(dst), progress=False)
    assert os.path.islink(dst / "images") and os.path.samefile(dst / "images", src / "images")
    converted = dst / "annotations_detectron2" / "validation" / f"{NAMES['validation'][0]}.png"
    assert np.array_equal(read(converted)[1], CONVERTED)
    assert not (src / "annotations_detectron2").exists()


def test_refuses_a_folder_that_is_not_the_raw_layout(tmp_path):
    src = write_raw(tmp_path)
    (tmp_path / "images_only" / "images" / "training").mkdir(parents=True)
    (tmp_path / "images_only" / "images" / "validation").mkdir()
    with pytest.raises(ValueError, match=r"not the raw ADE20K layout.*expected the folders images/training/, "
                                         r"images/validation/, annotations/training/, annotations/validation/.*"
                                         r"but annotations/training/, annotations/validation/ are missing; "
                                         r"found: images/"):
        prepare_ade20k(str(tmp_path / "images_only"), progress=False)
    with pytest.raises(ValueError, match=r"It holds ADEChallengeData2016/: pass .*ADEChallengeData2016 instead"):
        prepare_ade20k(str(tmp_path), progress=False)  # the folder above it
    with pytest.raises(FileNotFoundError, match="No such folder"):
        prepare_ade20k(str(tmp_path / "missing"), progress=False)
    name = NAMES["validation"][0]
    Image.fromarray(np.full((3, 4), 151, np.uint8)).save(src / "annotations" / "validation" / f"{name}.png")
    with pytest.raises(ValueError, match=rf"{name}.png has label 151, above 150: not a raw ADE20K annotation"):
        prepare_ade20k(str(src), progress=False)


def test_tool_reports_conversion_then_nothing_to_do(tmp_path, capsys):
    src = write_raw(tmp_path)
    tool = load_script("tools/prepare_ade20k.py")
    tool.main([str(src), "--no-progress"])
    printed = capsys.readouterr().out
    assert "training: converted 2 label maps into" in printed and "validation: converted 1 label maps" in printed
    assert f"Use it with DETECTRON2_DATASETS={tmp_path}" in printed
    tool.main([str(src), "--no-progress"])
    printed = capsys.readouterr().out
    assert "training: all 2 label maps already converted" in printed and "nothing to do" in printed
    with pytest.raises(SystemExit, match="prepare_ade20k.py: .* is not the raw ADE20K layout"):
        tool.main([str(src / "images"), "--no-progress"])


@pytest.fixture
def ade20k_like():
    """Metadata as Detectron2's builtin ade20k_sem_seg_val has, under a folder of the test's choosing."""
    names = []

    def register(root, split="validation"):
        name = f"ade20k_sem_seg_tmp{len(names)}"
        MetadataCatalog.get(name).set(image_root=str(root / "images" / split),
                                      sem_seg_root=str(root / "annotations_detectron2" / split))
        names.append(name)
        return name

    yield register
    for name in names:
        MetadataCatalog.remove(name)


def test_unconverted_download_stops_with_the_command(tmp_path, ade20k_like):
    src = write_raw(tmp_path)
    name = ade20k_like(src)
    cfg = get_denseclip_cfg(os.path.join(REPO, ADE20K_CONFIG))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), (name,)
    with pytest.raises(FileNotFoundError, match=rf"annotations_detectron2/validation, which does not exist.*raw "
                                                rf"annotations.*\n  python tools/prepare_ade20k.py {src}$"):
        register_datasets_from_config(cfg)
    prepare_ade20k(str(src), progress=False)
    register_datasets_from_config(cfg)  # converted: no complaint
    (src / "annotations_detectron2" / "validation" / f"{NAMES['validation'][0]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)1 of the raw annotations .* interrupted conversion.*prepare"):
        check_ade20k_prepared([name])
    check_ade20k_prepared(["coco_2017_val", "shapes_sem_seg_val"])  # not ADE20K: not looked at
    check_ade20k_prepared([ade20k_like(tmp_path / "nothing_here")])  # nothing at all: left to the loader


@pytest.mark.slow
def test_train_net_names_the_tool(tmp_path):
    """$DETECTRON2_DATASETS holding the raw download: train_net.py --eval-only stops before building anything."""
    write_raw(tmp_path)
    result = run_script(["train_net.py", "--eval-only", "--config-file", ADE20K_CONFIG, "MODEL.DEVICE", "cpu"],
                        env={"DETECTRON2_DATASETS": str(tmp_path)}, timeout=300)
    assert result.returncode != 0
    assert f"python tools/prepare_ade20k.py {tmp_path / 'ADEChallengeData2016'}" in result.stdout, result.stdout[-3000:]
