import json
import os

import cv2
import numpy as np
import open_clip
import pytest
import torch
from pycocotools.coco import COCO

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.evaluation import COCOEvaluator, SemSegEvaluator
from detectron2.structures import Boxes, BoxMode, Instances, PolygonMasks

from denseclip.data import read_label_map
from denseclip.data.datasets import shapes
from denseclip.modeling import tokenize_class_names

TINY = dict(num_train=8, num_val=4, image_size=64)


def generate(folder, seed=0):
    return shapes.generate_shapes_dataset(str(folder), seed=seed, **TINY)


def files(root):
    """{relative path: bytes} of every file under ``root``."""
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return root, generate(root)


def test_same_seed_gives_identical_files_and_another_seed_differs(dataset, tmp_path):
    root, _ = dataset
    generate(tmp_path / "again")
    generate(tmp_path / "other", seed=1)
    reference = files(root)
    # an image and a label map per image
    assert len([p for p in reference if p.endswith(".png")]) == 2 * (TINY["num_train"] + TINY["num_val"])
    assert files(tmp_path / "again") == reference
    other = files(tmp_path / "other")
    assert other.keys() == reference.keys()
    for path in ("annotations/instances_train.json", "train/00000.png", "sem_seg/train/00000.png"):
        assert other[path] != reference[path]


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_coco_annotations_match_masks_and_images(dataset, split):
    root, json_files = dataset
    coco = COCO(json_files[split])
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(shapes.SHAPE_CLASSES)
    assert coco.getCatIds() == [1, 2, 3, 4, 5]
    assert len(coco.getImgIds()) == TINY[f"num_{split}"]
    for image in coco.loadImgs(coco.getImgIds()):
        pixels = cv2.imread(str(root / split / image["file_name"]))
        assert pixels.shape == (image["height"], image["width"], 3) == (64, 64, 3)
        assert 1 <= len(coco.getAnnIds(imgIds=[image["id"]])) <= 4
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert ann["category_id"] in coco.cats and ann["iscrowd"] == 0
        assert isinstance(ann["segmentation"], list) and all(len(p) >= 6 for p in ann["segmentation"])
        mask = coco.annToMask(ann).astype(bool)
        assert mask.any() and ann["area"] > 0
        assert mask.sum() == ann["area"]  # the polygons rasterize back to the annotated mask
        ys, xs = np.nonzero(mask)
        extent = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        np.testing.assert_allclose(ann["bbox"], extent, atol=1)


def test_polygons_of_a_ring_keep_its_hole():
    ring = shapes.shape_mask("ring", np.array([30.0, 33.0]), 20.0, 0.0, 64)
    assert not ring[33, 30]
    polygons = shapes.mask_to_polygons(ring)
    assert len(polygons) == 1
    rasterized = utils.polygons_to_bitmask(polygons, 64, 64)  # Detectron2's (pycocotools) rasterizer
    np.testing.assert_array_equal(rasterized, ring)
    # The hole runs the other way round, so shoelace areas subtract it (vertices sit 1/8 px inside the edges).
    assert PolygonMasks([polygons]).area().item() == pytest.approx(ring.sum(), rel=0.05)


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_label_maps_match_the_coco_masks(dataset, split):
    """Each label map holds, per pixel, the class of the annotation whose polygon covers it (the visible
    parts do not overlap), and "background" elsewhere; no pixel is ignored."""
    root, json_files = dataset
    coco = COCO(json_files[split])
    background = shapes.SEM_SEG_CLASSES.index("background")
    for image in coco.loadImgs(coco.getImgIds()):
        labels = cv2.imread(str(root / "sem_seg" / split / image["file_name"]), cv2.IMREAD_UNCHANGED)
        expected = np.full((image["height"], image["width"]), background)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            mask = coco.annToMask(annotation).astype(bool)
            assert (expected[mask] == background).all()  # disjoint
            expected[mask] = annotation["category_id"] - 1
        assert labels.dtype == np.uint8 and np.array_equal(labels, expected)


def test_class_names_are_single_clip_tokens():
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    assert all(len(tokenizer.encode(name)) == 1 for name in shapes.SEM_SEG_CLASSES)
    tokens = tokenize_class_names(list(shapes.SHAPE_CLASSES), prompt_length=5)
    assert tokens.shape == (5, 5)


@pytest.fixture
def registered(tmp_path):
    root = tmp_path / "shapes"
    names = shapes.register_shapes(str(root), seed=3, prefix="test_shapes", **TINY)
    yield root, names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_registration_generates_on_first_use(registered):
    root, (train, val) = registered
    assert (train, val) == ("test_shapes_train", "test_shapes_val")
    assert "shapes_train" in DatasetCatalog.list() and "shapes_val" in DatasetCatalog.list()
    assert not root.exists()  # registering is cheap

    dicts = DatasetCatalog.get(train)
    assert (root / "done.json").exists()
    assert len(dicts) == TINY["num_train"]
    annotations = [a for d in dicts for a in d["annotations"]]
    assert annotations and all(a["segmentation"] and a["bbox_mode"] == BoxMode.XYWH_ABS for a in annotations)
    assert all(os.path.exists(d["file_name"]) and d["height"] == d["width"] == 64 for d in dicts)

    marker_time = os.stat(root / "done.json").st_mtime_ns
    assert len(DatasetCatalog.get(val)) == TINY["num_val"]
    assert os.stat(root / "done.json").st_mtime_ns == marker_time  # not regenerated

    metadata = MetadataCatalog.get(train)
    assert metadata.thing_classes == list(shapes.SHAPE_CLASSES)
    assert metadata.evaluator_type == "coco" and os.path.exists(metadata.json_file)
    instances = utils.annotations_to_instances(dicts[0]["annotations"], (64, 64))  # default polygon format
    assert isinstance(instances.gt_masks, PolygonMasks) and len(instances) == len(dicts[0]["annotations"])


def test_changed_parameters_regenerate(tmp_path):
    shapes.prepare_shapes(str(tmp_path), **TINY)
    shapes.prepare_shapes(str(tmp_path), **{**TINY, "num_train": 3})
    with open(tmp_path / "annotations" / "instances_train.json") as f:
        assert len(json.load(f)["images"]) == 3
    assert not (tmp_path / "train" / "00003.png").exists()


def test_ground_truth_as_predictions_scores_full_ap(registered):
    _, (_, val) = registered
    shapes.ensure_shapes_dataset(val)  # COCOEvaluator reads the json file when built
    evaluator = COCOEvaluator(val, tasks=("bbox", "segm"), distributed=False)
    evaluator.reset()
    for record in DatasetCatalog.get(val):
        annotations = record["annotations"]
        instances = Instances((record["height"], record["width"]))
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.ones(len(annotations))
        instances.pred_classes = torch.tensor([a["category_id"] for a in annotations])
        masks = [utils.polygons_to_bitmask(a["segmentation"], record["height"], record["width"]) for a in annotations]
        instances.pred_masks = torch.from_numpy(np.stack(masks))
        evaluator.process([record], [{"instances": instances}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)


def test_command_line_reports_counts(tmp_path, capsys):
    shapes.main(["--output", str(tmp_path), "--num-train", "3", "--num-val", "2", "--image-size", "64"])
    printed = capsys.readouterr().out
    assert str(tmp_path / "annotations" / "instances_val.json") in printed
    assert all(name in printed for name in shapes.SHAPE_CLASSES)
    assert (tmp_path / "done.json").exists() and len(list((tmp_path / "val").iterdir())) == 2


def test_sem_seg_registration_generates_on_first_use_and_scores_full_miou(tmp_path):
    """The label maps as a Detectron2 sem-seg dataset: generated on first use, sharing the detection
    view's files; SemSegEvaluator on the ground truth as predictions gives 100 mIoU."""
    root = tmp_path / "shapes"
    names = shapes.register_shapes_sem_seg(str(root), seed=3, prefix="test_sem_seg", **TINY)
    try:
        assert names == ("test_sem_seg_train", "test_sem_seg_val")
        assert "shapes_sem_seg_train" in DatasetCatalog.list() and "shapes_sem_seg_val" in DatasetCatalog.list()
        assert not root.exists()
        metadata = MetadataCatalog.get(names[1])
        assert metadata.stuff_classes == ["circle", "square", "triangle", "star", "ring", "background"]
        assert metadata.ignore_label == 255 and metadata.evaluator_type == "sem_seg"
        assert len(metadata.stuff_colors) == 6

        dicts = DatasetCatalog.get(names[1])
        assert (root / "done.json").exists() and len(dicts) == TINY["num_val"]
        assert [os.path.relpath(d["file_name"], root) for d in dicts[:2]] == ["val/00000.png", "val/00001.png"]
        assert [os.path.relpath(d["sem_seg_file_name"], root) for d in dicts[:2]] == [
            "sem_seg/val/00000.png", "sem_seg/val/00001.png"]
        marker = os.stat(root / "done.json").st_mtime_ns
        shapes.register_shapes(str(root), seed=3, prefix="test_sem_seg_coco", **TINY)
        assert len(DatasetCatalog.get("test_sem_seg_coco_val")) == TINY["num_val"]
        assert os.stat(root / "done.json").st_mtime_ns == marker  # the same files: not regenerated

        evaluator = SemSegEvaluator(names[1], distributed=False, sem_seg_loading_fn=read_label_map)
        evaluator.reset()
        for record in dicts:
            labels = torch.from_numpy(cv2.imread(record["sem_seg_file_name"], cv2.IMREAD_UNCHANGED).astype(np.int64))
            logits = torch.nn.functional.one_hot(labels, 6).permute(2, 0, 1).float()
            evaluator.process([record], [{"sem_seg": logits}])
        assert evaluator.evaluate()["sem_seg"]["mIoU"] == pytest.approx(100.0)
    finally:
        for name in (*names, "test_sem_seg_coco_train", "test_sem_seg_coco_val"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
