#!/usr/bin/env python
"""
The quick start: train a small DenseCLIP Mask R-CNN on the generated shapes dataset on CPU, evaluate
box and mask AP with COCOEvaluator, and draw predictions and pixel-text score maps.

    python tools/quickstart.py [--config-file ...] [--num-pictures N] [KEY VALUE ...]
"""
import argparse
import json
import logging
import os
import time
import warnings

import cv2

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from denseclip import get_denseclip_cfg
from denseclip.data.datasets.shapes import ensure_shapes_dataset
from denseclip.engine import DenseCLIPPredictor, DenseCLIPTrainer
from denseclip.utils.visualization import render_prediction

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "configs/Shapes-InstanceSegmentation/mask_rcnn_denseclip_tiny_FPN.yaml",
)
TARGETS = {"bbox": 50.0, "segm": 40.0}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--num-pictures", type=int, default=8, help="val images to draw")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return parser.parse_args(argv)


def print_results(results) -> None:
    print("\nCOCO evaluation on the generated val split (COCOEvaluator, pycocotools):")
    print(f"  {'task':<6}{'AP':>7}{'AP50':>7}{'AP75':>7}   target")
    for task, name in (("bbox", "box"), ("segm", "mask")):
        if task in results:
            r = results[task]
            verdict = "met" if r["AP"] >= TARGETS[task] else "NOT met"
            print(f"  {name:<6}{r['AP']:7.1f}{r['AP50']:7.1f}{r['AP75']:7.1f}   AP >= {TARGETS[task]:.0f}: {verdict}")


def write_pictures(cfg, num_pictures: int) -> str:
    """Predictions and score-map panels for the first val images; returns the folder."""
    folder = os.path.join(cfg.OUTPUT_DIR, "pictures")
    os.makedirs(folder, exist_ok=True)
    predictor = DenseCLIPPredictor(cfg)
    dataset = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset)
    for record in DatasetCatalog.get(dataset)[:num_pictures]:
        image_bgr = cv2.imread(record["file_name"])
        predictions, probabilities = predictor.predict_with_score_maps(image_bgr)
        overlay, panel = render_prediction(
            image_bgr, predictions, probabilities, metadata, predictor.model.backbone.class_names
        )
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        cv2.imwrite(os.path.join(folder, f"{stem}_predictions.png"), overlay)
        cv2.imwrite(os.path.join(folder, f"{stem}_score_maps.png"), panel)
    return folder


def main(args) -> dict:
    cfg = get_denseclip_cfg(args.config_file, args.opts)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    for name, abbrev in (("detectron2", "d2"), ("denseclip", "dc")):
        setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name=name, abbrev_name=abbrev)
    # Notices from PyTorch internals that say nothing about this run.
    warnings.filterwarnings("ignore", message="torch.meshgrid")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
        f.write(cfg.dump())

    print(
        "DenseCLIP quick start. No CLIP weights can be downloaded here, so the model is a small\n"
        "CLIP-shaped network (image encoder, frozen text encoder, context decoder) with random\n"
        f"weights, trained on CPU on the generated shapes dataset. Config: {args.config_file}\n"
    )
    start = time.perf_counter()
    for dataset in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        ensure_shapes_dataset(dataset)
        print(f"Dataset {dataset}: {MetadataCatalog.get(dataset).image_root}")

    trainer = DenseCLIPTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()  # evaluates on DATASETS.TEST at the end (COCOEvaluator)

    print_results(results)
    folder = write_pictures(cfg.clone(), args.num_pictures) if args.num_pictures else None
    summary = {task: dict(results[task]) for task in ("bbox", "segm") if task in results}
    with open(os.path.join(cfg.OUTPUT_DIR, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nFinished in {(time.perf_counter() - start) / 60:.1f} min. Written to {cfg.OUTPUT_DIR}:")
    print("  model_final.pth   the trained weights (train_net.py --eval-only / demo/demo.py take them)")
    print("  results.json      the AP table above")
    if folder:
        print("  pictures/         *_predictions.png (detections and masks), *_score_maps.png (each class's")
        print("                    pixel-text score map as a heatmap beside the image; from random CLIP")
        print("                    weights they stay nearly flat in so short a run, see README.md)")
    return summary


if __name__ == "__main__":
    main(parse_args())
