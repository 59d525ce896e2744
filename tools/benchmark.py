#!/usr/bin/env python
"""
Speed of a DenseCLIP model against its CLIP baseline, built side by side in one process with the same
weights wherever their parameters match, on the same random input (denseclip/utils/benchmark.py).

    python tools/benchmark.py --config-file configs/COCO-Detection/retinanet_denseclip_R_50_FPN_1x.yaml
    python tools/benchmark.py --config-file ... --task train --iterations 5
    python tools/benchmark.py --config-file ... --detectron2 --amp --batch-size 8   # on a GPU

The baseline is --baseline-config, or else the same config with its task's CLIP-baseline meta-architecture
(RetinaNet, GeneralizedRCNN, SlidingWindowSemanticSegmentor): what the COCO and ADE20K "clip" configs
differ by. --detectron2 adds Detectron2's own R50-FPN detector of the same kind (model-zoo config, random
weights, its own recipe).
inference: median seconds per batch (--batch-size images, default 1), eval mode, of the baseline, of
    DenseCLIP (text embeddings cached, the default) and of DenseCLIP re-encoding the prompts every
    forward (as the release); images per second. Detectors' score thresholds are 0, so every model returns
    its full quota of detections (with random weights the count above 0.05 differs from model to model).
train: median seconds per training step of Detectron2's SimpleTrainer (AMPTrainer with --amp, GPU only)
    on a batch (default 2 images) with random boxes and masks; on a GPU also the step's peak memory.
--amp: autocast, float16 on a GPU, bfloat16 on a CPU (inference). --clock process: the process's CPU
seconds instead of elapsed time (CPU only); with --threads 1 they do not depend on what else the machine
runs. Runs of the models are interleaved; a model that runs out of GPU memory is reported as such.
"""
import argparse
import contextlib
import json
import sys
import time

import torch

import denseclip  # noqa: F401  (first, so that its warning filters also cover the notices Detectron2 raises on import)

from detectron2.utils.events import EventStorage

from denseclip.utils.benchmark import (
    FIXED_WORKLOAD, benchmark_configs, build_side_by_side, detectron2_config_name, interleaved_medians,
    peak_step_memory_mb, step_of,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a DenseCLIP config")
    parser.add_argument("--baseline-config", default="", help="its CLIP baseline (default: see above)")
    parser.add_argument("--task", choices=("inference", "train"), default="inference")
    parser.add_argument("--iterations", type=int, default=10, help="timed runs of each model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each model first")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                        help="image size (default 800 1333 for inference, 512 512 for train)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default 1 for inference, 2 for train)")
    parser.add_argument("--amp", action="store_true", help="autocast: float16 on GPUs, bfloat16 on CPUs")
    parser.add_argument("--detectron2", action="store_true", help="also Detectron2's own R50-FPN detector")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="process: CPU seconds of this process instead of elapsed time (CPU only)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--json-out", default="", help="also append the result as one JSON line to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for all models: KEY VALUE")
    args = parser.parse_args(argv)
    args.input_size = tuple(args.input_size or ((800, 1333) if args.task == "inference" else (512, 512)))
    args.batch_size = args.batch_size or (1 if args.task == "inference" else 2)
    return args


def ratio(value, reference):
    return value / reference if value and reference else None


def measure(args) -> dict:
    cuda = torch.device(args.device).type == "cuda"
    if cuda and args.clock == "process":
        raise ValueError("--clock process measures CPU time; on a GPU use --clock wall")
    opts = (FIXED_WORKLOAD if args.task == "inference" else []) + list(args.opts) + [
        "MODEL.DEVICE", args.device, "MODEL.WEIGHTS", ""]
    cfgs = benchmark_configs(args.config_file, opts, args.baseline_config, args.detectron2, args.task == "inference")
    models = build_side_by_side(cfgs)
    train = args.task == "train"
    with EventStorage(0):
        steps = {n: step_of(train, cfgs[n], m, args.input_size, args.batch_size, args.amp) for n, m in models.items()}
        clock = time.process_time if args.clock == "process" else time.perf_counter
        seconds = interleaved_medians(steps, args.iterations, args.warmup, clock, cuda)
        memory = {n: peak_step_memory_mb(step) for n, step in steps.items()} if train and cuda else {}
    return {
        "task": args.task,
        "config": args.config_file,
        "baseline": args.baseline_config or f"the same config, {cfgs['baseline'].MODEL.META_ARCHITECTURE}",
        "detectron2": detectron2_config_name(cfgs["baseline"]) if args.detectron2 else None,
        "device": f"{args.device} ({torch.cuda.get_device_name(args.device)})" if cuda else args.device,
        "precision": ("AMP float16" if cuda else "AMP bfloat16") if args.amp else "float32",
        "input_size": list(args.input_size),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "iterations": args.iterations,
        "seconds": seconds,
        "images_per_second": {n: args.batch_size / s if s else None for n, s in seconds.items()},
        "ratio": {n: ratio(s, seconds["baseline"]) for n, s in seconds.items() if n != "baseline"},
        "ratio_to_detectron2": {n: ratio(s, seconds["detectron2"]) for n, s in seconds.items()} if args.detectron2 else None,
        "peak_memory_mb": memory or None,
        "memory_ratio": ratio(memory.get("denseclip"), memory.get("baseline")) if memory else None,
    }


def print_table(result: dict) -> None:
    """One row per model: seconds per batch, images per second, ratios (and peak training memory)."""
    height, width = result["input_size"]
    print(
        f"{result['task']} of {result['batch_size']} x {height} x {width} on {result['device']}, {result['precision']}, "
        f"{result['threads']} CPU threads, median of {result['iterations']} interleaved runs"
        f"{' (process CPU time)' if result['clock'] == 'process' else ''}; baseline (CLIP): {result['baseline']}"
        + (f"; detectron2: {result['detectron2']}, random weights" if result["detectron2"] else "")
    )
    columns = [("s / batch", "seconds", ".4f"), ("images/s", "images_per_second", ".2f"), ("to CLIP", "ratio", ".3f")]
    columns += [("to D2", "ratio_to_detectron2", ".3f")] if result["detectron2"] else []
    columns += [("peak MB", "peak_memory_mb", ".0f")] if result["peak_memory_mb"] else []
    print(f"  {'model':<20}" + "".join(f"{title:>10}" for title, _, _ in columns))
    for name, value in result["seconds"].items():
        cells = []
        for _, key, spec in columns:
            cell = result[key].get(name, 1.0 if key == "ratio" and value else None)
            cells.append(f"{cell:10{spec}}" if cell is not None else f"{'OOM':>10}")
        print(f"  {name:<20}" + "".join(cells))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:  # in JSON mode stdout carries the result only
        with contextlib.redirect_stdout(sys.stderr) if args.format == "json" else contextlib.nullcontext():
            result = measure(args)
    except ValueError as e:
        sys.exit(f"benchmark.py: {e}")
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")
    if args.format == "json":
        print(json.dumps(result))
    else:
        print_table(result)
    return result


if __name__ == "__main__":
    main()
