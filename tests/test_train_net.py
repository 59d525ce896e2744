"""Training and evaluating tiny DenseCLIP detectors the way users run them: DenseCLIPTrainer and
train_net.py on COCO-format data."""
import json
import os
import re

import numpy as np
import pytest
import torch

from denseclip.engine import DenseCLIPTrainer

from helpers import REPO, TINY_SHAPES_CONFIGS, dataset_opts, load_cfg, run_script, tiny_opts, write_coco_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def coco_dataset(tmp_path_factory):
    return write_coco_dataset(str(tmp_path_factory.mktemp("own_dataset")), num_images=8)


@pytest.mark.parametrize("kind", ["retinanet", "mask_rcnn"])
def test_train_then_eval_only(kind, coco_dataset, tmp_path):
    output_dir = str(tmp_path / kind)
    opts = dataset_opts(*coco_dataset) + tiny_opts(kind, output_dir, iterations=30)
    cfg = load_cfg(TINY_SHAPES_CONFIGS[kind], opts)
    test_sets, cfg.DATASETS.TEST = cfg.DATASETS.TEST, ()  # evaluated after training, in process and by --eval-only
    trainer = DenseCLIPTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    history = trainer.storage.history("total_loss").values()
    losses = np.array([value for value, _ in history])
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.8 * losses[:5].mean()
    score_map_losses = [v for v, _ in trainer.storage.history("loss_score_map").values()]
    assert np.isfinite(score_map_losses).all() and score_map_losses[-1] < score_map_losses[0]
    assert os.path.isfile(os.path.join(output_dir, "model_final.pth"))

    result = run_script([
        "train_net.py", "--config-file", TINY_SHAPES_CONFIGS[kind], "--eval-only",
        *dataset_opts(*coco_dataset), *tiny_opts(kind, output_dir, 30),
        "MODEL.WEIGHTS", os.path.join(output_dir, "model_final.pth"),
    ])
    assert result.returncode == 0, result.stdout[-3000:]
    assert ("Evaluation results for segm" in result.stdout) == (kind == "mask_rcnn")
    # The AP train_net.py --eval-only prints is the in-process evaluation's of the trained model.
    cfg.defrost()
    cfg.DATASETS.TEST = test_sets
    in_process = DenseCLIPTrainer.test(cfg, trainer.model)
    printed = re.findall(r"copypaste: AP,AP50,AP75,APs,APm,APl\n.*copypaste: ([-\d.,nan]+)", result.stdout)
    tasks = ["bbox", "segm"] if kind == "mask_rcnn" else ["bbox"]
    assert len(printed) == len(tasks), result.stdout[-3000:]
    for task, line in zip(tasks, printed):
        expected = [in_process[task][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        assert [float(v) for v in line.split(",")] == pytest.approx(expected, abs=1e-4, nan_ok=True), task


def test_own_dataset_class_names_come_from_the_json(coco_dataset):
    cfg = load_cfg(TINY_SHAPES_CONFIGS["mask_rcnn"], dataset_opts(*coco_dataset) + ["MODEL.ROI_HEADS.NUM_CLASSES", "3"])
    assert cfg.DATASETS.TRAIN == ("coco_format_train",) and cfg.DATASETS.TEST == ("coco_format_test",)
    model = DenseCLIPTrainer.build_model(cfg)
    assert model.backbone.class_names == ["apple", "bottle", "cup"]


def test_own_dataset_class_count_mismatch_for_the_clip_baseline(coco_dataset):
    """The CLIP baseline has no prompts to compare with its head: the trainer compares the dataset's classes."""
    cfg = load_cfg(TINY_SHAPES_CONFIGS["mask_rcnn"], dataset_opts(*coco_dataset))  # 5 classes
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    with pytest.raises(ValueError, match=r"has 3 classes but MODEL.ROI_HEADS.NUM_CLASSES is 5.*NUM_CLASSES 3"):
        DenseCLIPTrainer.build_model(cfg)


def test_own_training_set_with_the_config_test_set_names_datasets_test(coco_dataset):
    """Only TRAIN_JSON set: the shapes config's DATASETS.TEST (5 classes) stays; that is the cause to name,
    not the head's class count."""
    json_file, images = coco_dataset  # 3 classes
    opts = ["DATASETS.COCO_FORMAT.TRAIN_JSON", json_file, "DATASETS.COCO_FORMAT.TRAIN_IMAGES", images,
            "MODEL.ROI_HEADS.NUM_CLASSES", "3"]
    cfg = load_cfg(TINY_SHAPES_CONFIGS["mask_rcnn"], opts)
    with pytest.raises(ValueError) as error:
        DenseCLIPTrainer.build_model(cfg)
    message = str(error.value)
    assert "DATASETS.TEST 'shapes_val' has 5 classes but DATASETS.TRAIN 'coco_format_train' has 3" in message
    assert "TEST_JSON" in message and "NUM_CLASSES" not in message


def test_own_dataset_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="TRAIN_JSON: no such file"):
        load_cfg(TINY_SHAPES_CONFIGS["mask_rcnn"], dataset_opts(str(tmp_path / "nope.json"), str(tmp_path)))
    with pytest.raises(ValueError, match="Set both DATASETS.COCO_FORMAT.TRAIN_JSON"):
        load_cfg(TINY_SHAPES_CONFIGS["mask_rcnn"], ["DATASETS.COCO_FORMAT.TRAIN_JSON", "x.json"])


def seeded_training(config_file, opts):
    """train_net.py's set-up (which seeds every generator with SEED), then training and the final
    evaluation: the loss of every iteration and the evaluation results."""
    import sys

    from detectron2.engine import default_argument_parser

    sys.path.insert(0, REPO)
    try:
        from train_net import setup
    finally:
        sys.path.pop(0)
    cfg = setup(default_argument_parser().parse_args(["--config-file", config_file, *opts]))
    trainer = DenseCLIPTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    losses = {name: [v for v, _ in trainer.storage.history(name).values()]
              for name in trainer.storage.histories() if name.startswith("loss_") or name == "total_loss"}
    return losses, results


def test_same_seed_gives_identical_losses_and_ap(coco_dataset, tmp_path):
    """The quick-start config, shortened, trained twice on the CPU with SEED 0 (and one thread: on a
    machine whose cores are shared, several threads make this tiny model crawl)."""
    runs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for run in ("first", "second"):
            opts = [*dataset_opts(*coco_dataset), *tiny_opts("mask_rcnn", str(tmp_path / run), 20)]
            runs.append(seeded_training(TINY_SHAPES_CONFIGS["mask_rcnn"], opts))
    finally:
        torch.set_num_threads(threads)
    (losses, results), (again, results_again) = runs
    assert len(losses["total_loss"]) == 20 and "loss_score_map" in losses and "loss_mask" in losses
    assert losses == again  # every loss of every iteration, exactly
    assert set(results) == {"bbox", "segm", "score_maps"}
    assert json.dumps(results) == json.dumps(results_again)  # AP and the score maps' IoU, exactly (NaN too)
    assert losses["total_loss"][0] != losses["total_loss"][-1]
