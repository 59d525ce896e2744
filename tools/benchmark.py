#!/usr/bin/env python
"""
Speed (and training memory) of a DenseCLIP detector against its CLIP baseline, built side by side in
one process with the same random weights wherever their parameters match, on the same random input.

    python tools/benchmark.py --config-file configs/COCO-Detection/retinanet_denseclip_R_50_FPN_1x.yaml
    python tools/benchmark.py --config-file ... --task train --iterations 5

inference: eval mode, torch.no_grad; median seconds per image of the baseline, of DenseCLIP with its
    text embeddings cached (the default) and with the cache disabled (the class prompts re-encoded on
    every forward, as in the original release); runs of the variants are interleaved.
train: median seconds per training step (forward, backward, optimizer step with
    denseclip.solver.build_optimizer) on a small batch with random boxes and masks, interleaved too;
    peak memory of each model's training measured in its own fresh process (see ``measure_memory``).

The baseline is --baseline-config, else the config path with "denseclip" replaced by "clip", else
(no such file) the same config with DenseCLIP switched off (MODEL.DENSECLIP.ENABLED False and the
stock meta-architecture), which is what the COCO CLIP configs differ by.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Sequence

import torch

from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from denseclip import get_denseclip_cfg
from denseclip.engine import head_num_classes
from denseclip.solver import build_optimizer

TARGETS = {"inference": 1.10, "train": 1.25}
DEFAULT_SIZES = {"inference": (800, 1333), "train": (512, 512)}
STOCK_META_ARCHITECTURES = {"DenseCLIPRCNN": "GeneralizedRCNN", "DenseCLIPRetinaNet": "RetinaNet"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a DenseCLIP config")
    parser.add_argument("--baseline-config", default="", help="its CLIP baseline (default: derived)")
    parser.add_argument("--task", choices=("inference", "train"), default="inference")
    parser.add_argument("--iterations", type=int, default=10, help="timed runs of each model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each model first")
    parser.add_argument(
        "--input-size", nargs=2, type=int, metavar=("H", "W"),
        help="image size (default 800 1333 for inference, 512 512 for train)",
    )
    parser.add_argument("--batch-size", type=int, default=2, help="images per training step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    # Internal: the fresh process in which one model's training memory is measured.
    parser.add_argument("--measure-memory-of", choices=("denseclip", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for both models: KEY VALUE")
    args = parser.parse_args(argv)
    args.input_size = tuple(args.input_size or DEFAULT_SIZES[args.task])
    return args


def baseline_source(args):
    """(config file, extra overrides) of the CLIP baseline."""
    if args.baseline_config:
        return args.baseline_config, []
    folder, name = os.path.split(args.config_file)
    derived = os.path.join(folder, name.replace("denseclip", "clip"))
    if derived != args.config_file and os.path.exists(derived):
        return derived, []
    meta = get_denseclip_cfg(args.config_file, args.opts).MODEL.META_ARCHITECTURE
    return args.config_file, [
        "MODEL.DENSECLIP.ENABLED", "False",
        "MODEL.META_ARCHITECTURE", STOCK_META_ARCHITECTURES.get(meta, meta),
    ]


def load_cfg(config_file: str, opts: Sequence[str], device: str):
    cfg = get_denseclip_cfg(config_file, list(opts) + ["MODEL.DEVICE", device, "MODEL.WEIGHTS", ""])
    cfg.freeze()
    return cfg


def build_models(args):
    """
    Configs and models "baseline" and "denseclip", plus for inference "denseclip_uncached" (the same
    with MODEL.DENSECLIP.CACHE_TEXT_EMBEDDINGS False). DenseCLIP starts from the baseline's weights
    wherever names and shapes match, the uncached copy from DenseCLIP's.
    """
    baseline_file, baseline_opts = baseline_source(args)
    cfgs = {
        "baseline": load_cfg(baseline_file, list(args.opts) + baseline_opts, args.device),
        "denseclip": load_cfg(args.config_file, args.opts, args.device),
    }
    if args.task == "inference":
        uncached = list(args.opts) + ["MODEL.DENSECLIP.CACHE_TEXT_EMBEDDINGS", "False"]
        cfgs["denseclip_uncached"] = load_cfg(args.config_file, uncached, args.device)
    if not cfgs["denseclip"].MODEL.DENSECLIP.ENABLED or cfgs["baseline"].MODEL.DENSECLIP.ENABLED:
        raise ValueError("--config-file must be a DenseCLIP config and the baseline a plain CLIP one")
    models = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        models[name] = build_model(cfg)
    share_weights(models["baseline"], models["denseclip"])
    if "denseclip_uncached" in models:
        share_weights(models["denseclip"], models["denseclip_uncached"])
    return cfgs, models


def share_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy every parameter and buffer of ``source`` that ``target`` has with the same name and shape."""
    target_state = target.state_dict()
    shared = {
        k: v for k, v in source.state_dict().items() if k in target_state and target_state[k].shape == v.shape
    }
    target.load_state_dict(shared, strict=False)


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """3 x H x W float image in 0..255."""
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)) * 255


def training_batch(batch_size: int, height: int, width: int, num_classes: int, boxes_per_image: int = 3):
    """Detectron2 training inputs: random images with random boxes, classes and box-shaped masks."""
    generator = torch.Generator().manual_seed(0)
    batch = []
    for i in range(batch_size):
        size = torch.rand(boxes_per_image, 2, generator=generator) * 0.4 + 0.2  # 20-60% of the image
        corner = torch.rand(boxes_per_image, 2, generator=generator) * (1 - size)
        scale = torch.tensor([width, height], dtype=torch.float32)
        boxes = torch.cat([corner, corner + size], dim=1) * scale.repeat(2)
        masks = torch.zeros(boxes_per_image, height, width, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
            mask[y0:y1, x0:x1] = True
        instances = Instances(
            (height, width),
            gt_boxes=Boxes(boxes),
            gt_classes=torch.randint(num_classes, (boxes_per_image,), generator=generator),
            gt_masks=BitMasks(masks),
        )
        batch.append({"image": random_image(height, width, seed=i), "height": height, "width": width,
                      "instances": instances})
    return batch


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(steps: Dict[str, Callable[[], None]], warmup: int, iterations: int, device: str):
    """
    Median seconds of each step over ``iterations`` timed rounds after ``warmup`` untimed ones. Each
    round runs every step once, starting from a different one each round, so drifts of the machine's
    speed fall on all alike. Returns ({name: median}, {name: [seconds]}).
    """
    names = list(steps)
    times = {name: [] for name in names}
    for round_index in range(warmup + iterations):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize(device)
            start = time.perf_counter()
            steps[name]()
            _synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, times


def benchmark_inference(args, cfgs, models) -> dict:
    height, width = args.input_size
    inputs = [{"image": random_image(height, width), "height": height, "width": width}]

    def run(model):
        model.eval()

        def step():
            with torch.no_grad():
                model(inputs)

        return step

    steps = {name: run(model) for name, model in models.items()}
    medians, times = interleaved_medians(steps, args.warmup, args.iterations, args.device)
    return {
        "seconds": medians,
        "ratio": medians["denseclip"] / medians["baseline"],
        "ratio_uncached": medians["denseclip_uncached"] / medians["baseline"],
        "all_seconds": times,
    }


def training_step(cfg, model, batch) -> Callable[[], None]:
    """One optimizer step of ``model`` (train mode) on ``batch``."""
    model.train()
    optimizer = build_optimizer(cfg, model)

    def step():
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    return step


def benchmark_train(args, cfgs, models) -> dict:
    batch = training_batch(args.batch_size, *args.input_size, head_num_classes(cfgs["denseclip"]))
    steps = {name: training_step(cfgs[name], models[name], batch) for name in models}
    with EventStorage(0):
        medians, times = interleaved_medians(steps, args.warmup, args.iterations, args.device)
    memory = {name: measure_memory(args, name) for name in models}
    return {
        "seconds": medians,
        "ratio": medians["denseclip"] / medians["baseline"],
        "all_seconds": times,
        "peak_memory_mb": memory,
        "memory_ratio": memory["denseclip"] / memory["baseline"] if memory["baseline"] else None,
        "memory_metric": MEMORY_METRIC["cuda" if args.device.startswith("cuda") else "cpu"],
    }


MEMORY_METRIC = {
    "cpu": "peak resident memory of the process during the training steps (VmHWM, reset through "
    "/proc/self/clear_refs once model, optimizer and batch were built) minus its resident memory at "
    "that point, in a fresh process per model: activations, gradients, AdamW state and what the "
    "allocator keeps",
    "cuda": "torch.cuda.max_memory_allocated during the training steps minus the memory allocated "
    "once model, optimizer and batch were built, in a fresh process per model: activations, gradients, "
    "AdamW state",
}


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def _reset_peak_memory(cuda: bool) -> float:
    """Start measuring a new peak; returns the memory in use now (MB)."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
    return _proc_status_mb("VmRSS")


def _peak_memory(cuda: bool) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if cuda else _proc_status_mb("VmHWM")


def memory_of_training(args) -> float:
    """In this (fresh) process: peak extra memory (MB) of training the one model named by the args."""
    name = args.measure_memory_of
    baseline_file, baseline_opts = baseline_source(args)
    config_file, opts = (args.config_file, args.opts) if name == "denseclip" else (baseline_file, args.opts + baseline_opts)
    cfg = load_cfg(config_file, opts, args.device)
    torch.manual_seed(0)
    batch = training_batch(args.batch_size, *args.input_size, head_num_classes(cfg))
    step = training_step(cfg, build_model(cfg), batch)
    cuda = args.device.startswith("cuda")
    before = _reset_peak_memory(cuda)
    with EventStorage(0):
        for _ in range(2):  # AdamW's state appears at the first step, the second has it all
            step()
    _synchronize(args.device)
    return _peak_memory(cuda) - before


def measure_memory(args, name: str) -> float:
    """Run ``memory_of_training`` for model ``name`` in a fresh Python process; MB."""
    command = [
        sys.executable, os.path.abspath(__file__), "--config-file", args.config_file,
        "--task", "train", "--threads", str(args.threads), "--input-size", *map(str, args.input_size),
        "--batch-size", str(args.batch_size), "--device", args.device, "--measure-memory-of", name,
    ]
    if args.baseline_config:
        command += ["--baseline-config", args.baseline_config]
    output = subprocess.run(command + list(args.opts), check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_memory_mb"]


LABELS = {
    "baseline": "CLIP baseline",
    "denseclip": "DenseCLIP",
    "denseclip_uncached": "DenseCLIP, prompts re-encoded every forward",
}


def print_text(result: dict) -> None:
    height, width = result["input_size"]
    what = "inference, 1 image" if result["task"] == "inference" else f"training step, {result['batch_size']} images"
    print(
        f"{what} of {height} x {width} (H x W) on {result['device']} ({result['threads']} threads): median "
        f"of {result['iterations']} interleaved runs each, after {result['warmup']} warm-up"
    )
    print(f"  baseline: {result['baseline_config']}")
    ratios = {"denseclip": result["ratio"], "denseclip_uncached": result.get("ratio_uncached")}
    for name, seconds in result["seconds"].items():
        runs = result["all_seconds"][name]
        line = f"  {LABELS[name]:<45}{seconds:9.3f} s  (runs {min(runs):.3f}-{max(runs):.3f})"
        if name in ratios:
            line += f"   ratio to CLIP {ratios[name]:.3f}"
        if name == "denseclip":
            verdict = "met" if result["ratio"] <= result["target_ratio"] else "NOT met"
            line += f" (target <= {result['target_ratio']:.2f}: {verdict})"
        print(line)
    if result["task"] == "train":
        memory = result["peak_memory_mb"]
        print(
            f"  peak training memory: CLIP {memory['baseline']:.0f} MB, DenseCLIP {memory['denseclip']:.0f} MB, "
            f"ratio {result['memory_ratio']:.3f}\n  ({result['memory_metric']})"
        )


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.measure_memory_of:
        with contextlib.redirect_stdout(sys.stderr):
            peak = memory_of_training(args)
        print(json.dumps({"peak_memory_mb": peak}))
        return {"peak_memory_mb": peak}
    quiet = contextlib.redirect_stdout(sys.stderr) if args.format == "json" else contextlib.nullcontext()
    with quiet:
        baseline_file, baseline_opts = baseline_source(args)
        cfgs, models = build_models(args)
        benchmark = benchmark_inference if args.task == "inference" else benchmark_train
        result = {
            "task": args.task,
            "config": args.config_file,
            "baseline_config": " ".join([baseline_file, *baseline_opts]),
            "device": args.device,
            "input_size": list(args.input_size),
            "batch_size": args.batch_size if args.task == "train" else 1,
            "warmup": args.warmup,
            "iterations": args.iterations,
            "threads": torch.get_num_threads(),
            "target_ratio": TARGETS[args.task],
            **benchmark(args, cfgs, models),
        }
    if args.format == "json":
        print(json.dumps(result))
    else:
        print_text(result)
    return result


if __name__ == "__main__":
    main()
