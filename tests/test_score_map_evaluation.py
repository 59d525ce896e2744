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
