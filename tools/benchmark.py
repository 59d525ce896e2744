#!/usr/bin/env python
"""
Speed (and training memory) of a DenseCLIP detector against its CLIP baseline, built side by side in
one process with the same weights wherever their parameters match, on the same random input.

    python tools/benchmark.py --config-file configs/COCO-Detection/retinanet_denseclip_R_50_FPN_1x.yaml
    python tools/benchmark.py --config-file ... --task train --iterations 5

The baseline is --baseline-config, or else the same config with the stock meta-architecture the
DenseCLIP one extends (RetinaNet, GeneralizedRCNN): what the COCO "clip" configs differ by.
inference: median seconds per image, eval mode, of the baseline, of DenseCLIP (text embeddings
    cached, the default) and of DenseCLIP re-encoding the prompts every forward (as the release).
train: median seconds per optimizer step on a batch with random boxes and masks; peak memory of each
    model's training, each in a fresh process (growth of resident memory on CPU, of allocated memory
    on GPU, once model, optimizer and batch are built).
Runs of the models are interleaved, so drifts of the machine's speed fall on all alike.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import denseclip  # noqa: F401  (before Detectron2: it silences warnings expected when Detectron2 is imported)

from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from denseclip import get_denseclip_cfg
from denseclip.engine import head_num_classes
from denseclip.modeling import DenseCLIPDetector
from denseclip.solver import build_optimizer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a DenseCLIP config")
    parser.add_argument("--baseline-config", default="", help="its CLIP baseline (default: see above)")
    parser.add_argument("--task", choices=("inference", "train"), default="inference")
    parser.add_argument("--iterations", type=int, default=10, help="timed runs of each model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each model first")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"),
                        help="image size (default 800 1333 for inference, 512 512 for train)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per training step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    # Internal: measure one model's training memory in this (fresh) process.
    parser.add_argument("--memory-of", choices=("denseclip", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for both models: KEY VALUE")
    args = parser.parse_args(argv)
    args.input_size = tuple(args.input_size or ((800, 1333) if args.task == "inference" else (512, 512)))
    return args


def configs(args) -> dict:
    """Frozen configs "denseclip" and "baseline" (and "denseclip_uncached" for inference)."""
    opts = list(args.opts) + ["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", ""]
    denseclip = get_denseclip_cfg(args.config_file, opts)
    meta = META_ARCH_REGISTRY.get(denseclip.MODEL.META_ARCHITECTURE)
    if not issubclass(meta, DenseCLIPDetector):
        raise ValueError(f"--config-file must be a DenseCLIP config, not {denseclip.MODEL.META_ARCHITECTURE}")
    if args.baseline_config:
        baseline = get_denseclip_cfg(args.baseline_config, opts)
    else:
        stock = next(base for base in meta.__bases__ if not issubclass(base, DenseCLIPDetector))
        baseline = get_denseclip_cfg(args.config_file, opts + ["MODEL.META_ARCHITECTURE", stock.__name__])
    cfgs = {"baseline": baseline, "denseclip": denseclip}
    if args.task == "inference":
        uncached = opts + ["MODEL.DENSECLIP.CACHE_TEXT_EMBEDDINGS", "False"]
        cfgs["denseclip_uncached"] = get_denseclip_cfg(args.config_file, uncached)
    for cfg in cfgs.values():
        cfg.freeze()
    return cfgs


def build_models(cfgs: dict) -> dict:
    """The models, DenseCLIP starting from the baseline's weights wherever names and shapes match."""
    models = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        models[name] = build_model(cfg)
    for source, target in (("baseline", "denseclip"), ("denseclip", "denseclip_uncached")):
        if target in models:
            own = models[target].state_dict()
            shared = {k: v for k, v in models[source].state_dict().items() if k in own and own[k].shape == v.shape}
            models[target].load_state_dict(shared, strict=False)
    return models


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)) * 255


def training_batch(batch_size: int, height: int, width: int, num_classes: int, objects: int = 3):
    """Random images, each with ``objects`` random boxes (20-60% of the image), classes and box masks."""
    generator = torch.Generator().manual_seed(0)
    batch = []
    for i in range(batch_size):
        size = torch.rand(objects, 2, generator=generator) * 0.4 + 0.2
        corner = torch.rand(objects, 2, generator=generator) * (1 - size)
        boxes = torch.cat([corner, corner + size], dim=1) * torch.tensor([width, height] * 2, dtype=torch.float32)
        masks = torch.zeros(objects, height, width, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
            mask[y0:y1, x0:x1] = True
        classes = torch.randint(num_classes, (objects,), generator=generator)
        instances = Instances((height, width), gt_boxes=Boxes(boxes), gt_classes=classes, gt_masks=BitMasks(masks))
        image = random_image(height, width, i)
        batch.append({"image": image, "height": height, "width": width, "instances": instances})
    return batch


def step_of(task: str, cfg, model, args):
    """A callable running one inference (eval mode) or one training step (train mode) of ``model``."""
    if task == "inference":
        model.eval()
        height, width = args.input_size
        inputs = [{"image": random_image(height, width), "height": height, "width": width}]

        def infer():
            with torch.no_grad():
                model(inputs)

        return infer
    model.train()
    optimizer = build_optimizer(cfg, model)
    batch = training_batch(args.batch_size, *args.input_size, head_num_classes(model)[0])

    def step():
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    return step


def interleaved_medians(steps: dict, args) -> dict:
    times = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(args.warmup + args.iterations):
        shift = round_index % len(names)  # each round starts from another model
        for name in names[shift:] + names[:shift]:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[name]()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory_mb(args) -> float:
    """In this fresh process: the extra memory two training steps of one model need."""
    cfg = configs(args)[args.memory_of]
    step = step_of("train", cfg, build_model(cfg), args)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident size (VmHWM) to the current one
        before = _status_mb("VmRSS")
    with EventStorage(0):
        for _ in range(2):  # AdamW's state appears at the first step
            step()
    return (torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mb("VmHWM")) - before


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) / 1024


def measure_memory(argv, name: str) -> float:
    """peak_memory_mb of model ``name`` in a fresh process run with the same arguments."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-of", name, *argv]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        with contextlib.redirect_stdout(sys.stderr):
            peak = peak_memory_mb(args)
        print(json.dumps(peak))
        return {"peak_memory_mb": peak}
    with contextlib.redirect_stdout(sys.stderr) if args.format == "json" else contextlib.nullcontext():
        cfgs = configs(args)
        models = build_models(cfgs)
        with EventStorage(0):
            seconds = interleaved_medians({n: step_of(args.task, cfgs[n], m, args) for n, m in models.items()}, args)
        result = {
            "task": args.task,
            "config": args.config_file,
            "baseline": args.baseline_config or f"the same config, {cfgs['baseline'].MODEL.META_ARCHITECTURE}",
            "device": args.device,
            "input_size": list(args.input_size),
            "batch_size": args.batch_size if args.task == "train" else 1,
            "threads": torch.get_num_threads(),
            "iterations": args.iterations,
            "seconds": seconds,
            "ratio": {n: s / seconds["baseline"] for n, s in seconds.items() if n != "baseline"},
        }
        if args.task == "train":
            memory = {name: measure_memory(argv, name) for name in ("baseline", "denseclip")}
            result.update(peak_memory_mb=memory, memory_ratio=memory["denseclip"] / memory["baseline"])
    if args.format == "json":
        print(json.dumps(result))
        return result
    height, width = result["input_size"]
    print(
        f"{args.task} of {result['batch_size']} x {height} x {width} on {args.device} ({result['threads']} "
        f"threads), median of {args.iterations} interleaved runs; baseline: {result['baseline']}"
    )
    for name, value in seconds.items():
        ratio = f"   ratio to CLIP {result['ratio'][name]:.3f}" if name in result["ratio"] else ""
        print(f"  {name:<20}{value:9.3f} s{ratio}")
    if args.task == "train":
        print(f"  peak training memory: CLIP {memory['baseline']:.0f} MB, DenseCLIP {memory['denseclip']:.0f} MB, "
              f"ratio {result['memory_ratio']:.3f}")
    return result


if __name__ == "__main__":
    main()
