#!/usr/bin/env python
"""
Export a trained DenseCLIP model to TorchScript or ONNX, and optionally evaluate the exported file.

    python tools/deploy/export_model.py --config-file <config> --format torchscript --output output/export \
        [--score-maps] [--vocabulary "cat,dog,traffic cone"] [--sample-image image.jpg] [--run-eval] \
        MODEL.WEIGHTS output/model_final.pth

writes output/export/model.ts (or model.onnx): one traced graph from a resized image to boxes, scores,
classes, masks (or a semantic segmentation) and score maps on the original image, with the text
embeddings computed once and stored in it. tools/deploy/exported_predictor.py runs it without this package (see its docstring).
--run-eval then evaluates the written file on DATASETS.TEST[0] with the evaluators of train_net.py.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

import denseclip  # noqa: F401  (first, so that its warning filters also cover the notices Detectron2 raises on import)

from detectron2.data import detection_utils
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.logger import setup_logger

from denseclip import DenseCLIPCheckpointer, get_denseclip_cfg, register_datasets_from_config
from denseclip.data import build_test_resize
from denseclip.engine import DenseCLIPTrainer
from denseclip.export import EXPORT_FORMATS, EXPORT_METHODS, export_model
from denseclip.modeling import parse_vocabulary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from exported_predictor import ExportedPredictor  # noqa: E402  (a stand-alone file beside this one)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="a DenseCLIP config")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="torchscript")
    parser.add_argument("--export-method", choices=EXPORT_METHODS, default="tracing",
                        help="tracing (scripting is refused with the reason: DenseCLIP does not compile)")
    parser.add_argument("--sample-image", help="image to trace with (default: a generated one of the test size)")
    parser.add_argument("--output", required=True, help="folder for model.ts / model.onnx")
    parser.add_argument("--score-maps", action="store_true", help="add the score maps of the model's classes")
    parser.add_argument("--vocabulary", help="comma-separated names whose score maps to return instead (baked in)")
    parser.add_argument("--run-eval", action="store_true", help="evaluate the written file on DATASETS.TEST[0]")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N",
                        help="time N interleaved runs of the eager model and of the written file on the sample")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return parser.parse_args(argv)


def sample_input(cfg, path=None):
    """The sample as DenseCLIPPredictor preprocesses it: (3 x h x w float32 resized, (height, width))."""
    if path:
        image = detection_utils.read_image(path, format=cfg.INPUT.FORMAT)
    else:  # any content traces the same graph; a 3:4 image exercises the resize rule
        side = cfg.INPUT.MIN_SIZE_TEST
        image = np.random.default_rng(0).integers(0, 256, (side, side * 4 // 3, 3), dtype=np.uint8)
    resized = build_test_resize(cfg).get_transform(image).apply_image(image)
    return torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)), image.shape[:2]


def as_model_outputs(outputs: dict, height: int, width: int) -> dict:
    """An exported graph's outputs as the model's own (Instances, score maps) for Detectron2's evaluators."""
    result = {name: torch.from_numpy(outputs[name]) for name in ("sem_seg", "score_maps") if name in outputs}
    if "boxes" in outputs:
        instances = Instances((height, width))
        instances.pred_boxes = Boxes(torch.from_numpy(outputs["boxes"]))
        instances.scores = torch.from_numpy(outputs["scores"])
        instances.pred_classes = torch.from_numpy(outputs["classes"])
        if "masks" in outputs:
            instances.pred_masks = torch.from_numpy(outputs["masks"])
        result["instances"] = instances
    return result


def evaluate_exported(cfg, path: str, output_dir: str):
    """Detectron2's inference_on_dataset with the exported file in place of the model."""
    predictor = ExportedPredictor(path)
    if "score_maps" not in predictor.metadata["outputs"] or predictor.score_map_names != predictor.class_names:
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.DENSECLIP.RETURN_SCORE_MAPS = False  # no score maps of the classes to measure
    dataset = cfg.DATASETS.TEST[0]

    def run(batched_inputs):
        return [
            as_model_outputs(predictor.run(x["image"].numpy(), x["height"], x["width"]), x["height"], x["width"])
            for x in batched_inputs
        ]

    loader = DenseCLIPTrainer.build_test_loader(cfg, dataset)
    evaluator = DenseCLIPTrainer.build_evaluator(cfg, dataset, os.path.join(output_dir, "inference"))
    return inference_on_dataset(run, loader, evaluator)


def benchmark(model, path: str, image: torch.Tensor, original_size, rounds: int) -> dict:
    """Median seconds per image of the eager model (as exported: same outputs) and of the exported file,
    run alternately on the same resized sample after one untimed run each."""
    predictor = ExportedPredictor(path)
    height, width = original_size
    inputs = {"image": image, "height": height, "width": width}
    if "score_maps" in predictor.metadata["outputs"]:
        inputs["vocabulary"] = predictor.score_map_names
    runs = {
        "eager": lambda: model([inputs]),
        "exported": lambda: predictor.run(image.numpy(), height, width),
    }
    times = {name: [] for name in runs}
    with torch.no_grad():
        for index in range(rounds + 1):
            for name in sorted(runs, reverse=index % 2 == 1):  # alternate which runs first
                start = time.perf_counter()
                runs[name]()
                if index > 0:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None):
    args = parse_args(argv)
    logger = setup_logger(name="denseclip")
    cfg = get_denseclip_cfg(args.config_file, args.opts)
    register_datasets_from_config(cfg)  # DATASETS.COCO_FORMAT.*, DATASETS.SEM_SEG_FOLDERS.*, as train_net.py
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.freeze()
    os.makedirs(args.output, exist_ok=True)

    model = build_model(cfg)
    DenseCLIPCheckpointer(model, text_weights=cfg.MODEL.DENSECLIP.TEXT_WEIGHTS).load(cfg.MODEL.WEIGHTS)
    model.eval()
    vocabulary = parse_vocabulary(args.vocabulary) if args.vocabulary else None
    image, original_size = sample_input(cfg, args.sample_image)
    path, metadata = export_model(
        cfg, model, image, original_size, args.output, args.format, args.export_method,
        score_maps=args.score_maps, vocabulary=vocabulary,
    )
    logger.info(f"Wrote {path}: outputs {metadata['outputs']}")
    if args.benchmark:
        medians = benchmark(model, path, image, original_size, args.benchmark)
        logger.info(
            f"Median of {args.benchmark} interleaved runs on a {image.shape[1]} x {image.shape[2]} input: eager "
            f"{medians['eager']:.3f} s, {args.format} {medians['exported']:.3f} s "
            f"(ratio {medians['exported'] / medians['eager']:.2f}; {torch.get_num_threads()} torch threads)"
        )
    if args.run_eval:
        del model
        logger.info(f"Evaluating {path} on {cfg.DATASETS.TEST[0]}")
        results = evaluate_exported(cfg, path, args.output)
        print_csv_format(results)
        return results
    return path


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # what cannot be exported, and why; no traceback to read through
        sys.exit(f"export_model.py: {e}")
