#!/usr/bin/env python
"""
FLOPs, parameters and structure of a CLIP / DenseCLIP detector or semantic segmentor, counted as in the
paper's tables (denseclip/utils/analysis.py): random weights, text encoder counted apart (its output is
cached), R-CNN heads on a fixed workload of 1000 (box) and 100 (mask) boxes; semantic segmentors on one
1024 x 1024 whole-image forward with the segmentation release's counting rules (printed with the count).

    python tools/analyze_model.py --config-file configs/COCO-Detection/retinanet_denseclip_R_50_FPN_1x.yaml
    python tools/analyze_model.py --config-file configs/ADE20K-SemanticSegmentation/semantic_fpn_denseclip_R_50_512x512_80k.yaml
    python tools/analyze_model.py --config-file ... --tasks flop --input-size 800 1280 --format json
    python tools/analyze_model.py --config-file ... --num-inputs 10   # mean over DATASETS.TEST images
"""
import argparse
import contextlib
import json
import logging
import sys
from itertools import islice

import torch

import denseclip  # noqa: F401  (first, so that its warning filters also cover the notices Detectron2 raises on import)

from detectron2.data import build_detection_test_loader
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.utils.analysis import parameter_count_table

from denseclip import get_denseclip_cfg, register_datasets_from_config
from denseclip.modeling import task_of
from denseclip.utils.analysis import (
    NUM_BOX_PROPOSALS,
    NUM_MASK_BOXES,
    SEGMENTATION_RULES,
    FlopReport,
    count_flops,
    parameter_split,
    text_encoders,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--tasks", nargs="+", choices=("flop", "parameter", "structure"), default=["flop", "parameter"])
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                        help="height and width of the random image (default 800 1280: the paper's 1280 x 800, W x H, "
                             "for detectors; 1024 1024, the segmentation release's, for semantic segmentors)")
    parser.add_argument("--num-inputs", type=int, default=0, help="mean over this many DATASETS.TEST images instead")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return parser.parse_args(argv)


def flop_inputs(cfg, args):
    if args.num_inputs > 0:
        register_datasets_from_config(cfg)
        return list(islice(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0]), args.num_inputs))
    height, width = args.input_size
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0)) * 255
    return [[{"image": image, "height": height, "width": width}]]


def giga(counter) -> dict:
    return {k: round(v / 1e9, 4) for k, v in sorted(counter.items(), key=lambda kv: -kv[1]) if k}


def rcnn_workload(cfg, model):
    if not isinstance(model, GeneralizedRCNN):
        return None
    return {"box_proposals": NUM_BOX_PROPOSALS, **({"mask_boxes": NUM_MASK_BOXES} if cfg.MODEL.MASK_ON else {})}


def do_flop(cfg, model, args) -> dict:
    inference, text, inputs = FlopReport(), None, flop_inputs(cfg, args)
    for batch in inputs:  # the mean over the inputs
        report, text = count_flops(model, batch)
        report = report.scaled(1 / len(inputs))
        inference.by_module.update(report.by_module)
        inference.by_operator.update(report.by_operator)
        inference.unsupported.update(report.unsupported)
    return {
        "input": f"{args.num_inputs} images of {cfg.DATASETS.TEST[0]}" if args.num_inputs else args.input_size,
        "counting_rules": SEGMENTATION_RULES if task_of(model).semantic_segmentation else None,
        "rcnn_dummy_workload": rcnn_workload(cfg, model),
        "gflops": round(inference.total / 1e9, 4),
        "gflops_text_encoder": round(text.total / 1e9, 4),
        "gflops_by_module": giga({k: v for k, v in inference.by_module.items() if k.count(".") < 2}),
        "gflops_by_operator": giga(inference.by_operator),
        "unsupported_ops": dict(inference.unsupported + text.unsupported),
    }


def do_parameter(cfg, model, args) -> dict:
    split = parameter_split(model)
    return {"params_m": round(split["inference"] / 1e6, 4), "params_m_text_encoder": round(split["text_encoder"] / 1e6, 4)}


def print_text(result: dict, model) -> None:
    print(f"config: {result['config']}")
    if "gflops" in result:
        what = result["input"]
        if isinstance(what, list):
            what = f"a random {what[0]} x {what[1]} (H x W) image"
        workload = result["rcnn_dummy_workload"]
        print(f"FLOPs on {what}, 1 multiply-add = 1 flop" + (f"; ROI heads on {workload}" if workload else ""))
        if result["counting_rules"]:
            print("  counted as the segmentation release's get_flops.py (fvcore of 2021):")
            print("\n".join(f"    - {rule}" for rule in result["counting_rules"]))
        print(f"  inference (text encoder cached, excluded): {result['gflops']:.2f} GFLOPs")
        print(f"  text encoder (once per class set):         {result['gflops_text_encoder']:.2f} GFLOPs")
        for name, flops in sorted(result["gflops_by_module"].items()):
            print(f"    {'  ' * name.count('.')}{name:<{48 - 2 * name.count('.')}}{flops:10.3f}")
        print("  by operator: " + ", ".join(f"{k} {v:.3f}" for k, v in result["gflops_by_operator"].items()))
        if result["unsupported_ops"]:
            print(f"WARNING: ops not counted (no handle): {result['unsupported_ops']}")
    if "params_m" in result:
        print(parameter_count_table(model, max_depth=2))
        total = result["params_m"] + result["params_m_text_encoder"]
        where = ", ".join(name for name, module in model.named_modules() if module in text_encoders(model))
        print(f"Parameters: {total:.2f}M in all (the table's model row) = {result['params_m']:.2f}M for inference "
              f"+ {result['params_m_text_encoder']:.2f}M of the frozen text encoder" + (f" ({where})" if where else "")
              + ", left out of the inference count because its output is cached")
    if "structure" in result:
        print(result["structure"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    # JSON mode: stdout carries the JSON object only; anything else printed goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.format == "json" else contextlib.nullcontext():
        logging.getLogger("fvcore").setLevel(logging.ERROR)
        cfg = get_denseclip_cfg(args.config_file, args.opts + ["MODEL.WEIGHTS", ""])  # counts need no weights
        if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
            cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg).eval()
        if args.input_size is None:
            args.input_size = [1024, 1024] if task_of(model).semantic_segmentation else [800, 1280]
        result = {"config": args.config_file}
        tasks = {"flop": do_flop, "parameter": do_parameter, "structure": lambda *_: {"structure": str(model)}}
        for task in dict.fromkeys(args.tasks):
            result.update(tasks[task](cfg, model, args))
    if args.format == "json":
        print(json.dumps(result))
    else:
        print_text(result, model)
    return result


if __name__ == "__main__":
    main()
