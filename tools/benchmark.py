#!/usr/bin/env python
"""
Speed (and training memory) of a DenseCLIP detector against its CLIP baseline, built side by side in
one process with the same weights wherever their parameters match, on the same random input.

    python tools/benchmark.py --config-file configs/COCO-Detection/retinanet_denseclip_R_50_FPN_1x.yaml
    python tools/benchmark.py --config-file ... --task train --iterations 5
    python tools/benchmark.py --config-file ... --detectron2 --amp --batch-size 8   # on a GPU

The baseline is --baseline-config, or else the same config with the stock meta-architecture the
DenseCLIP one extends (RetinaNet, GeneralizedRCNN): what the COCO "clip" configs differ by.
--detectron2 adds Detectron2's own R50-FPN detector of the same kind (RetinaNet, Mask R-CNN or Faster
R-CNN), built from Detectron2's model-zoo config with random weights and trained with its own recipe
(SGD, frozen BatchNorm, stem and res2 frozen).
inference: median seconds per batch (--batch-size images, default 1), eval mode, of the baseline, of
    DenseCLIP (text embeddings cached, the default) and of DenseCLIP re-encoding the prompts every
    forward (as the release); images per second. Score thresholds are 0, so every model returns 100
    detections per image (with random weights the count above 0.05 differs from model to model).
train: median seconds per optimizer step on a batch (default 2 images) with random boxes and masks;
    peak memory of each model's training, each in a fresh process (growth of resident memory on CPU,
    of allocated memory on GPU, once model, optimizer and batch are built).
--amp: autocast, float16 on a GPU (training with a gradient scaler, as Detectron2's AMPTrainer),
    bfloat16 on a CPU. On a GPU the timed region is bracketed by torch.cuda.synchronize().
--clock process: the process's CPU seconds instead of elapsed time (CPU only); with --threads 1 they
    do not depend on what else the machine runs.
Runs of the models are interleaved, so drifts of the machine's speed fall on all alike. A model that
runs out of GPU memory is reported as such and the others go on.
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

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.solver import build_optimizer as build_detectron2_optimizer
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
    parser.add_argument("--batch-size", type=int, help="images per batch (default 1 for inference, 2 for train)")
    parser.add_argument("--amp", action="store_true", help="autocast: float16 on GPUs, bfloat16 on CPUs")
    parser.add_argument("--detectron2", action="store_true", help="also Detectron2's own R50-FPN detector")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="process: CPU seconds of this process instead of elapsed time (CPU only; with "
                             "--threads 1 it does not depend on what else the machine runs)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--json-out", default="", help="also append the result as one JSON line to this file")
    # Internal: measure one model's training memory in this (fresh) process.
    parser.add_argument("--memory-of", choices=("denseclip", "baseline", "detectron2"), help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for both models: KEY VALUE")
    args = parser.parse_args(argv)
    args.input_size = tuple(args.input_size or ((800, 1333) if args.task == "inference" else (512, 512)))
    args.batch_size = args.batch_size or (1 if args.task == "inference" else 2)
    return args


# Detectron2's own R50-FPN detector of each kind (model-zoo config names).
DETECTRON2_MODELS = {
    "RetinaNet": "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
    "GeneralizedRCNN": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
    "GeneralizedRCNN+mask": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml",
}


def detectron2_cfg(baseline, device: str):
    """Detectron2's model-zoo R50-FPN config of the baseline's kind, random weights, on ``device``."""
    kind = baseline.MODEL.META_ARCHITECTURE + ("+mask" if baseline.MODEL.MASK_ON else "")
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(DETECTRON2_MODELS[kind]))
    cfg.merge_from_list([*FIXED_WORKLOAD, "MODEL.DEVICE", device, "MODEL.WEIGHTS", ""])
    return cfg


# Inference at a fixed workload: with random weights, how many detections pass the configs' score
# threshold differs from model to model, and Mask R-CNN's mask head runs on each of them (100 boxes
# cost it 53 GFLOPs). With threshold 0 every model returns TEST.DETECTIONS_PER_IMAGE (100) detections,
# the workload of the FLOP counts.
FIXED_WORKLOAD = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]


def configs(args) -> dict:
    """Frozen configs "denseclip" and "baseline" (and "denseclip_uncached" for inference)."""
    opts = list(args.opts) + ["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", ""]
    if args.task == "inference":
        opts = FIXED_WORKLOAD + opts
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
    if args.detectron2:
        cfgs["detectron2"] = detectron2_cfg(baseline, args.device)
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


def autocast(args):
    """Autocast for --amp (float16 on CUDA, bfloat16 on CPU), else nothing."""
    device_type = torch.device(args.device).type
    dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    return torch.autocast(device_type, dtype=dtype, enabled=args.amp)


def step_of(task: str, cfg, model, args):
    """A callable running one inference (eval mode) or one training step (train mode) of ``model``."""
    if task == "inference":
        model.eval()
        height, width = args.input_size
        inputs = [{"image": random_image(height, width, i), "height": height, "width": width}
                  for i in range(args.batch_size)]

        def infer():
            with torch.no_grad(), autocast(args):
                model(inputs)

        return infer
    model.train()
    optimizer = (build_optimizer if "OPTIMIZER" in cfg.SOLVER else build_detectron2_optimizer)(cfg, model)
    batch = training_batch(args.batch_size, *args.input_size, head_num_classes(model)[0])
    # As Detectron2's AMPTrainer: float16 gradients are scaled; bfloat16 needs no scaling.
    scaler = torch.amp.GradScaler("cuda") if args.amp and torch.device(args.device).type == "cuda" else None

    def step():
        with autocast(args):
            losses = model(batch)
        optimizer.zero_grad()
        loss = sum(losses.values())
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


def interleaved_medians(steps: dict, args) -> dict:
    """Median seconds per run of each step, runs interleaved; None for a model out of GPU memory."""
    cuda = torch.device(args.device).type == "cuda"
    if cuda and args.clock == "process":
        raise ValueError("--clock process measures CPU time; on a GPU use --clock wall")
    clock = time.process_time if args.clock == "process" else time.perf_counter
    times = {name: [] for name in steps}
    failed = set()
    names = list(steps)
    for round_index in range(args.warmup + args.iterations):
        shift = round_index % len(names)  # each round starts from another model
        for name in names[shift:] + names[:shift]:
            if name in failed:
                continue
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            try:
                steps[name]()
                if cuda:
                    torch.cuda.synchronize()
            except torch.OutOfMemoryError:
                failed.add(name)
                torch.cuda.empty_cache()
                continue
            if round_index >= args.warmup:
                times[name].append(clock() - start)
    return {name: None if name in failed else statistics.median(t) for name, t in times.items()}


def peak_memory_mb(args) -> float:
    """In this fresh process: the extra memory two training steps of one model need."""
    cfg = configs(args)[args.memory_of]
    step = step_of("train", cfg, build_model(cfg), args)
    cuda = torch.device(args.device).type == "cuda"
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


def measure_memory(argv, name: str):
    """peak_memory_mb of model ``name`` in a fresh process run with the same arguments (None: out of
    GPU memory)."""
    command = [sys.executable, os.path.abspath(__file__), "--memory-of", name, *argv]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode and "OutOfMemoryError" in run.stderr:
        return None
    if run.returncode:
        raise RuntimeError(f"Measuring the training memory of {name} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.splitlines()[-1])


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
            "device": device_name(args.device),
            "precision": precision(args),
            "input_size": list(args.input_size),
            "batch_size": args.batch_size,
            "threads": torch.get_num_threads(),
            "clock": args.clock,
            "iterations": args.iterations,
            "seconds": seconds,
            "images_per_second": {n: args.batch_size / s if s else None for n, s in seconds.items()},
            "ratio": {n: ratio(s, seconds["baseline"]) for n, s in seconds.items() if n != "baseline"},
        }
        if args.detectron2:
            result["detectron2"] = DETECTRON2_MODELS[cfgs["detectron2"].MODEL.META_ARCHITECTURE
                                                     + ("+mask" if cfgs["detectron2"].MODEL.MASK_ON else "")]
            result["ratio_to_detectron2"] = {n: ratio(s, seconds["detectron2"]) for n, s in seconds.items()}
        if args.task == "train":
            memory = {name: measure_memory(argv, name) for name in models if name != "denseclip_uncached"}
            result.update(peak_memory_mb=memory, memory_ratio=ratio(memory["denseclip"], memory["baseline"]))
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")
    if args.format == "json":
        print(json.dumps(result))
        return result
    print_table(result, args)
    return result


def ratio(value, reference):
    return value / reference if value and reference else None


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def precision(args) -> str:
    if not args.amp:
        return "float32"
    return "AMP float16" if torch.device(args.device).type == "cuda" else "AMP bfloat16"


def print_table(result: dict, args) -> None:
    """One row per model: seconds per batch, images per second, ratios (and peak training memory)."""
    height, width = result["input_size"]
    print(
        f"{args.task} of {result['batch_size']} x {height} x {width} on {result['device']}, {result['precision']}, "
        f"{result['threads']} CPU threads, median of {args.iterations} interleaved runs"
        f"{' (process CPU time)' if args.clock == 'process' else ''}; baseline (CLIP): "
        f"{result['baseline']}" + (f"; detectron2: {result['detectron2']}, random weights" if args.detectron2 else "")
    )
    train = args.task == "train"
    header = f"  {'model':<20}{'s / batch':>10}{'images/s':>10}{'to CLIP':>9}"
    header += f"{'to D2':>8}" if args.detectron2 else ""
    header += f"{'peak MB':>9}" if train else ""
    print(header)

    def cell(value, spec, width):
        return f"{value:{width}{spec}}" if value is not None else f"{'OOM':>{width}}"

    for name, value in result["seconds"].items():
        row = f"  {name:<20}{cell(value, '.4f', 10)}{cell(result['images_per_second'][name], '.2f', 10)}"
        row += cell(result["ratio"].get(name, 1.0 if value else None), ".3f", 9)
        if args.detectron2:
            row += cell(result["ratio_to_detectron2"][name], ".3f", 8)
        if train:
            row += cell(result["peak_memory_mb"].get(name), ".0f", 9)
        print(row)


if __name__ == "__main__":
    main()
