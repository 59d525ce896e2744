#!/usr/bin/env python
"""
The quick start: train a small DenseCLIP model on the generated shapes dataset on CPU, evaluate it and
the same model untrained (the floor), and draw the trained model's predictions and score maps.

--task instance (default): a Mask R-CNN; box and mask AP (COCOEvaluator) and how well its pixel-text
score maps locate each class (mean IoU). --task semseg: a Semantic FPN on the label maps; mIoU
(SemSegEvaluator).

    python tools/quickstart.py [--task instance|semseg] [--config-file ...] [--num-pictures N] [KEY VALUE ...]
"""
import argparse
import json
import os
import time

import cv2
import torch

import denseclip  # noqa: F401  (first, so that its warning filters also cover the notices Detectron2 raises on import)

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from denseclip import get_denseclip_cfg, register_datasets_from_config
from denseclip.data.datasets.shapes import ensure_shapes_dataset
from denseclip.engine import DenseCLIPPredictor, DenseCLIPTrainer
from denseclip.evaluation import ScoreMapEvaluator
from denseclip.modeling import task_of
from denseclip.utils.visualization import render_prediction

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TASK_CONFIGS = {
    "instance": os.path.join(_CONFIGS, "Shapes-InstanceSegmentation/mask_rcnn_denseclip_tiny_FPN.yaml"),
    "semseg": os.path.join(_CONFIGS, "Shapes-SemanticSegmentation/semantic_fpn_denseclip_tiny.yaml"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASK_CONFIGS), default="instance",
                        help="which small config --config-file defaults to (default: %(default)s)")
    parser.add_argument("--config-file", default=None, help="default: the task's config under configs/Shapes-*")
    parser.add_argument("--num-pictures", type=int, default=8, help="val images to draw")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    args = parser.parse_args(argv)
    args.config_file = args.config_file or TASK_CONFIGS[args.task]
    return args


def evaluate_untrained(cfg) -> dict:
    """The floor: the same model before training (random weights), evaluated as the trained one is:
    mIoU for a semantic segmentor, else the score-map metric."""
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
    if task_of(cfg).semantic_segmentation:
        return DenseCLIPTrainer.test(cfg, build_model(cfg))["sem_seg"]
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DENSECLIP.RETURN_SCORE_MAPS = True
    model = build_model(cfg)
    dataset = cfg.DATASETS.TEST[0]
    return DenseCLIPTrainer.test(cfg, model, evaluators=[ScoreMapEvaluator(dataset)])["score_maps"]


def print_results(results: dict) -> None:
    print("\nEvaluation on the generated val split:")
    if "bbox" in results:
        print(f"  {'':<28}{'AP':>7}{'AP50':>7}{'AP75':>7}")
    for task, name in (("bbox", "boxes (COCOEvaluator)"), ("segm", "masks (COCOEvaluator)")):
        if task in results:
            r = results[task]
            print(f"  {name:<28}{r['AP']:7.1f}{r['AP50']:7.1f}{r['AP75']:7.1f}")
    if "score_maps" in results:
        trained, untrained = results["score_maps"], results["score_maps_untrained"]
        per_class = ", ".join(f"{k[4:]} {v:.1f}" for k, v in trained.items() if k.startswith("IoU-"))
        print(
            f"  score maps: mean IoU of sigmoid(score) > 0.5 with the class masks: {trained['mIoU']:.1f} "
            f"({per_class}); untrained model: {untrained['mIoU']:.1f}"
        )
    if "sem_seg" in results:
        trained, untrained = results["sem_seg"], results["sem_seg_untrained"]
        per_class = ", ".join(f"{k[4:]} {v:.1f}" for k, v in trained.items() if k.startswith("IoU-"))
        print(f"  label maps (SemSegEvaluator): mIoU {trained['mIoU']:.1f} ({per_class}), pixel accuracy "
              f"{trained['pACC']:.1f}")
        print(f"  untrained model: mIoU {untrained['mIoU']:.1f}, pixel accuracy {untrained['pACC']:.1f}")


def write_pictures(cfg, num_pictures: int) -> str:
    """Predictions and score-map panels of the model in MODEL.WEIGHTS for the first val images."""
    folder = os.path.join(cfg.OUTPUT_DIR, "pictures")
    os.makedirs(folder, exist_ok=True)
    predictor = DenseCLIPPredictor(cfg, score_maps=True)
    dataset = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset)
    for record in DatasetCatalog.get(dataset)[:num_pictures]:
        image_bgr = cv2.imread(record["file_name"])
        overlay, panel = render_prediction(image_bgr, predictor(image_bgr), metadata, predictor.score_map_names)
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        cv2.imwrite(os.path.join(folder, f"{stem}_predictions.png"), overlay)
        cv2.imwrite(os.path.join(folder, f"{stem}_score_maps.png"), panel)
    return folder


def main(args) -> dict:
    cfg = get_denseclip_cfg(args.config_file, args.opts)
    register_datasets_from_config(cfg)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    for name, abbrev in (("detectron2", "d2"), ("denseclip", "dc")):
        setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name, abbrev_name=abbrev)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())

    print(
        "DenseCLIP quick start. No CLIP weights can be downloaded here, so the model is a small\n"
        "CLIP-shaped network (image encoder, frozen text encoder, context decoder) with random\n"
        f"weights, trained on CPU on the generated shapes dataset. Config: {args.config_file}\n"
    )
    start = time.perf_counter()
    # SEED seeds the model's initialisation and the data order (as train_net.py's default_setup does).
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    for dataset in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        if MetadataCatalog.get(dataset).get("shapes_root"):  # generated on first use
            ensure_shapes_dataset(dataset)
        print(f"Dataset {dataset}: {MetadataCatalog.get(dataset).image_root}")

    trainer = DenseCLIPTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = dict(trainer.train())  # evaluates on DATASETS.TEST at the end
    trained_weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    for task in ("score_maps", "sem_seg"):
        if task in results:
            results[f"{task}_untrained"] = evaluate_untrained(cfg)
    print_results(results)

    folder = None
    if args.num_pictures:
        print(f"\nDrawing {args.num_pictures} val images with the trained weights {trained_weights}")
        trained = cfg.clone()
        trained.defrost()
        trained.MODEL.WEIGHTS = trained_weights
        folder = write_pictures(trained, args.num_pictures)
    summary = {"weights": trained_weights, **{task: dict(values) for task, values in results.items()}}
    with open(os.path.join(cfg.OUTPUT_DIR, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nFinished in {(time.perf_counter() - start) / 60:.1f} min. Written to {cfg.OUTPUT_DIR}:")
    print("  model_final.pth   the trained weights (train_net.py --eval-only / demo/demo.py take them)")
    print("  results.json      the numbers above")
    if folder and "sem_seg" in results:
        print("  pictures/         drawn by model_final.pth: *_predictions.png (the predicted label map over the")
        print("                    image, a legend below), *_score_maps.png (each class's pixel-text score map,")
        print("                    softmax over the classes, beside the image)")
    elif folder:
        print("  pictures/         drawn by model_final.pth: *_predictions.png (detections and masks),")
        print("                    *_score_maps.png (each class's pixel-text score map beside the image)")
    return summary


if __name__ == "__main__":
    main(parse_args())
