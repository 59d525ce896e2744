#!/usr/bin/env python
"""
FLOPs, parameters and structure of a CLIP / DenseCLIP detector, counted as in the paper's tables
(see denseclip/utils/analysis.py): random weights, eval mode, text encoder counted apart because its
output is cached, R-CNN heads on a fixed workload of 1000 (box) and 100 (mask) boxes.

    python tools/analyze_model.py --config-file configs/COCO-Detection/retinanet_denseclip_R_50_FPN_1x.yaml
    python tools/analyze_model.py --config-file ... --tasks flop --input-size 800 1280 --format json
    python tools/analyze_model.py --config-file ... --num-inputs 10   # mean over DATASETS.TEST images
"""
import argparse
import contextlib
import json
import logging
import sys
from itertools import islice
from typing import Dict, List

import torch

from detectron2.data import build_detection_test_loader
from detectron2.modeling import build_model
from detectron2.utils.analysis import parameter_count_table

from denseclip import get_denseclip_cfg
from denseclip.utils.analysis import analyze_flops, parameter_split, rcnn_workload

TASKS = ("flop", "parameter", "structure")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["flop", "parameter"])
    parser.add_argument(
        "--input-size", nargs=2, type=int, default=[800, 1280], metavar=("H", "W"),
        help="random image size, height then width (default: the paper's 1280 x 800 image)",
    )
    parser.add_argument(
        "--num-inputs", type=int, default=0,
        help="count on this many DATASETS.TEST images (mean) instead of one random --input-size image",
    )
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return parser.parse_args(argv)


def setup(args):
    cfg = get_denseclip_cfg(args.config_file, args.opts)
    # FLOPs and parameter counts do not depend on the weights: none are loaded.
    cfg.MODEL.WEIGHTS = ""
    cfg.DATALOADER.NUM_WORKERS = 0
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def flop_inputs(cfg, args) -> List[List[dict]]:
    """Single-image batches: N test-set images, or one random H x W image."""
    if args.num_inputs > 0:
        loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
        return list(islice(loader, args.num_inputs))
    height, width = args.input_size
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, height, width, generator=generator) * 255
    return [[{"image": image, "height": height, "width": width}]]


def _giga(counter) -> Dict[str, float]:
    return {k: round(v / 1e9, 4) for k, v in sorted(counter.items(), key=lambda kv: -kv[1])}


def do_flop(cfg, model, args) -> dict:
    report = analyze_flops(model, flop_inputs(cfg, args))
    fixed_size = args.num_inputs <= 0
    return {
        "input_size": list(args.input_size) if fixed_size else None,
        "dataset": None if fixed_size else cfg.DATASETS.TEST[0],
        "num_inputs": report.num_inputs,
        "rcnn_dummy_workload": rcnn_workload(model),
        "gflops": round(report.inference.total / 1e9, 4),
        "gflops_text_encoder": round(report.text_encoder.total / 1e9, 4),
        "gflops_total_with_text_encoder": round(report.total_with_text_encoder / 1e9, 4),
        "gflops_by_module": _giga(report.inference.top_level()),
        "gflops_by_submodule": _giga(
            {k: v for k, v in report.inference.by_module.items() if k.count(".") in (1, 2)}
        ),
        "gflops_by_operator": _giga(report.inference.by_operator),
        "gflops_text_encoder_by_operator": _giga(report.text_encoder.by_operator),
        "unsupported_ops": dict(report.unsupported),
        "ignored_ops": dict(sorted(report.ignored.items())),
    }


def do_parameter(cfg, model, args) -> dict:
    split = parameter_split(model)
    return {
        "params_m": round(split["inference"] / 1e6, 4),
        "params_m_text_encoder": round(split["text_encoder"] / 1e6, 4),
        "params_m_total": round((split["inference"] + split["text_encoder"]) / 1e6, 4),
    }


def do_structure(cfg, model, args) -> dict:
    return {"structure": str(model)}


def print_text(result: dict, model) -> None:
    print(f"config: {result['config']}")
    if "gflops" in result:
        where = (
            f"one random {result['input_size'][0]} x {result['input_size'][1]} (H x W) image"
            if result["input_size"]
            else f"mean of {result['num_inputs']} images of {result['dataset']}"
        )
        print(f"FLOPs on {where}, 1 multiply-add = 1 flop")
        if result["rcnn_dummy_workload"]:
            print(f"  ROI heads on a fixed workload: {result['rcnn_dummy_workload']}")
        print(f"  inference (text encoder cached, excluded): {result['gflops']:.2f} GFLOPs")
        print(f"  text encoder (once per class set):         {result['gflops_text_encoder']:.2f} GFLOPs")
        print(f"  total with text encoder:                   {result['gflops_total_with_text_encoder']:.2f} GFLOPs")
        print("  by module (GFLOPs):")
        by_module = {**result["gflops_by_module"], **result["gflops_by_submodule"]}
        for name in sorted(by_module):
            print(f"    {'  ' * name.count('.')}{name:<{50 - 2 * name.count('.')}}{by_module[name]:10.3f}")
        print("  by operator (GFLOPs): " + ", ".join(f"{k} {v:.3f}" for k, v in result["gflops_by_operator"].items()))
        if result["unsupported_ops"]:
            print(f"WARNING: ops not counted (no handle): {result['unsupported_ops']}")
        else:
            print(f"  every op counted or deliberately ignored (ignored: {', '.join(result['ignored_ops'])})")
    if "params_m" in result:
        print(parameter_count_table(model, max_depth=2))
        print(
            f"Parameters: {result['params_m']:.2f}M for inference (the frozen text encoder's "
            f"{result['params_m_text_encoder']:.2f}M excluded, its contexts included); "
            f"{result['params_m_total']:.2f}M in all"
        )
    if "structure" in result:
        print(result["structure"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    # JSON mode: stdout carries the JSON object only; anything else printed goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if args.format == "json" else contextlib.nullcontext()
    with quiet:
        logging.getLogger("fvcore").setLevel(logging.ERROR)
        cfg = setup(args)
        model = build_model(cfg).eval()
        result = {"config": args.config_file}
        for task in dict.fromkeys(args.tasks):
            result.update({"flop": do_flop, "parameter": do_parameter, "structure": do_structure}[task](cfg, model, args))
    if args.format == "json":
        print(json.dumps(result))
    else:
        print_text(result, model)
    return result


if __name__ == "__main__":
    main()
