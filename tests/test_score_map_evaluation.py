import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from denseclip.evaluation import ScoreMapEvaluator, class_masks, score_map_intersection_union

from helpers import write_coco_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    json_file, image_dir = write_coco_dataset(str(tmp_path_factory.mktemp("score_maps")), num_images=4)
    name = "score_map_evaluation_test"
    register_coco_instances(name, {}, json_file, image_dir)
    DatasetCatalog.get(name)  # fills thing_classes
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def logits_from(masks: torch.Tensor) -> torch.Tensor:
    """Score-map logits whose sigmoid is > 0.5 exactly on ``masks``."""
    return torch.where(masks, torch.tensor(3.0), torch.tensor(-3.0))


def evaluate(dataset, score_maps_of) -> dict:
    evaluator = ScoreMapEvaluator(dataset)
    evaluator.reset()
    for record in DatasetCatalog.get(dataset):
        masks = class_masks(record, 3)
        evaluator.process([{"image_id": record["image_id"]}], [{"score_maps": score_maps_of(masks)}])
    return evaluator.evaluate()["score_maps"]


def test_class_masks_are_the_union_of_the_instances(dataset):
    record = DatasetCatalog.get(dataset)[0]
    masks = class_masks(record, 3)
    assert masks.shape == (3, 96, 96)
    for annotation in record["annotations"]:  # the rectangles of write_coco_dataset
        x, y, w, h = (int(v) for v in annotation["bbox"])
        assert masks[annotation["category_id"], y : y + h, x : x + w].all()
    covered = sum(int(a["bbox"][2] * a["bbox"][3]) for a in record["annotations"])
    assert masks.any(0).sum() <= covered


def test_intersection_and_union():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2] = True  # 8 pixels
    predicted = torch.zeros(2, 4, 4, dtype=torch.bool)
    predicted[0, 1:3] = True  # 8 pixels, 4 shared
    intersection, union = score_map_intersection_union(logits_from(predicted), masks)
    assert intersection.tolist() == [4, 0] and union.tolist() == [12, 0]


def test_perfect_score_maps_give_100_and_inverted_ones_0(dataset):
    perfect = evaluate(dataset, logits_from)
    assert perfect["mIoU"] == pytest.approx(100.0)
    inverted = evaluate(dataset, lambda masks: logits_from(~masks))
    assert inverted["mIoU"] == pytest.approx(0.0)
    assert set(perfect) == {"mIoU", "IoU-apple", "IoU-bottle", "IoU-cup"}


def test_missing_score_maps_are_a_clear_error(dataset):
    evaluator = ScoreMapEvaluator(dataset)
    with pytest.raises(ValueError, match="MODEL.DENSECLIP.RETURN_SCORE_MAPS True"):
        evaluator.process([{"image_id": 1}], [{"instances": None}])


def test_class_masks_of_rle_and_box_only_annotations():
    """RLE segmentations (compressed and uncompressed, column-major runs) and annotations with only a
    box (its pixels rounded to the grid); masks written by hand on a 4 x 5 image."""
    from detectron2.structures import BoxMode

    height, width = 4, 5
    # Uncompressed RLE: runs over pixels in column-major order: 5 off (column 0, row 0 of column 1),
    # 2 on (rows 1-2 of column 1), then off.
    uncompressed = {"size": [height, width], "counts": [5, 2, 13]}
    compressed = mask_util.encode(np.asfortranarray(np.eye(height, width, dtype=np.uint8)))  # the diagonal
    box_only = {"bbox": [1.4, 0.6, 2.2, 2.0], "bbox_mode": BoxMode.XYWH_ABS}  # x 1.4..3.6, y 0.6..2.6
    record = {"height": height, "width": width, "annotations": [
        {"segmentation": uncompressed, "category_id": 0, "bbox": [1, 1, 1, 2], "bbox_mode": BoxMode.XYWH_ABS},
        {"segmentation": compressed, "category_id": 1, "bbox": [0, 0, 4, 4], "bbox_mode": BoxMode.XYWH_ABS},
        {**box_only, "category_id": 2},
        {**box_only, "segmentation": [], "category_id": 2},  # an empty polygon list: the box too
    ]}
    masks = class_masks(record, 3)
    expected = torch.zeros(3, height, width, dtype=torch.bool)
    expected[0, 1:3, 1] = True
    expected[1, [0, 1, 2, 3], [0, 1, 2, 3]] = True
    expected[2, 1:3, 1:4] = True  # rows round(0.6)=1 .. round(2.6)=3, columns round(1.4)=1 .. round(3.6)=4
    assert torch.equal(masks, expected)


def test_evaluate_sums_every_process_before_dividing(dataset, monkeypatch):
    """With 2 processes, rank 0 adds the other rank's intersections and unions to its own before the
    IoU; the other rank returns nothing."""
    from denseclip.evaluation import score_map_evaluation

    evaluator = ScoreMapEvaluator(dataset)
    evaluator._intersection, evaluator._union = torch.tensor([4, 0, 1]), torch.tensor([12, 0, 4])
    other = (torch.tensor([2, 3, 0]), torch.tensor([4, 3, 0]))  # what the second process counted
    gathered = []
    monkeypatch.setattr(score_map_evaluation.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(score_map_evaluation.comm, "gather", lambda data, dst=0: gathered.append(data) or [data, other])
    monkeypatch.setattr(score_map_evaluation.comm, "is_main_process", lambda: True)
    results = evaluator.evaluate()["score_maps"]
    assert len(gathered) == 1
    # apple (4 + 2) / (12 + 4), bottle 3 / 3, cup 1 / 4.
    assert results == pytest.approx({"mIoU": (37.5 + 100 + 25) / 3, "IoU-apple": 37.5, "IoU-bottle": 100.0, "IoU-cup": 25.0})
    monkeypatch.setattr(score_map_evaluation.comm, "is_main_process", lambda: False)
    assert evaluator.evaluate() == {}
