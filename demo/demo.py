#!/usr/bin/env python
"""
Run a trained DenseCLIP (or CLIP baseline) model on images, a folder, a video or a webcam, and write
the predictions drawn on each input (detections, or a semantic segmentor's label map); --score-maps
adds each class's pixel-text score map, --vocabulary those of any names.

    python demo/demo.py --config-file <config> --input images/*.jpg --output out/ --score-maps \
        --opts MODEL.WEIGHTS output/model_final.pth MODEL.DEVICE cpu
"""
import argparse
import functools
import glob
import os
import sys
import tempfile
import time

import cv2
import numpy as np
import tqdm

import denseclip  # noqa: F401  (first, so that its warning filters also cover the notices Detectron2 raises on import)

from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor import VisualizationDemo, read_image_bgr  # noqa: E402

from denseclip import get_denseclip_cfg, register_datasets_from_config  # noqa: E402
from denseclip.modeling import parse_vocabulary  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def get_parser():
    parser = argparse.ArgumentParser(description="DenseCLIP demo")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--webcam", action="store_true", help="take input from the webcam")
    parser.add_argument("--video-input", help="path to a video file")
    parser.add_argument("--input", nargs="+", help="image files, glob patterns or folders")
    parser.add_argument("--output", help="folder (or, for one image or a video, a file) to write to")
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="detections drawn (detectors only)")
    parser.add_argument("--score-maps", action="store_true", help="also write per-class score-map heatmaps")
    parser.add_argument(
        "--vocabulary",
        help='score maps of these comma-separated names, e.g. "cat,dog,traffic cone", with the learned '
        "prompts (implies --score-maps; the detections or label map keep the model's classes)",
    )
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return parser


def expand_inputs(patterns):
    """Image paths from files, glob patterns and folders, in order."""
    paths = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            paths += sorted(
                os.path.join(pattern, f) for f in os.listdir(pattern) if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        else:
            matches = sorted(glob.glob(os.path.expanduser(pattern)))
            if not matches:
                raise FileNotFoundError(f"--input {pattern}: no such file, folder or matching images")
            paths += matches
    return paths


def output_path(output, input_path, suffix, single):
    if single and os.path.splitext(output)[1]:
        stem, ext = os.path.splitext(output)
        return output if not suffix else f"{stem}{suffix}{ext}"
    os.makedirs(output, exist_ok=True)
    stem = os.path.splitext(os.path.basename(input_path))[0]
    return os.path.join(output, f"{stem}{suffix}.png")


def describe(predictions: dict, demo) -> str:
    """One line about a prediction: the instances drawn, or the classes of the label map by area."""
    if "sem_seg" in predictions:
        labels = predictions["sem_seg"].argmax(dim=0)
        counts = np.bincount(labels.flatten().cpu().numpy(), minlength=predictions["sem_seg"].shape[0])
        names = demo.metadata.get("stuff_classes") or [str(k) for k in range(len(counts))]
        order = [k for k in np.argsort(-counts, kind="stable") if counts[k]]
        shares = ", ".join(f"{names[k]} {100 * counts[k] / labels.numel():.1f}%" for k in order)
        return f"label map of {len(order)} classes ({shares})"
    instances = predictions["instances"]
    drawn = int((instances.scores >= demo.confidence_threshold).sum())
    return f"{drawn} of {len(instances)} instances drawn (score >= {demo.confidence_threshold})"


def run_on_images(demo, paths, output):
    for path in tqdm.tqdm(paths, disable=not output):
        image = read_image_bgr(path)
        start = time.perf_counter()
        predictions, overlay, panel = demo.run_on_image(image)
        print(f"{path}: {describe(predictions, demo)} in {time.perf_counter() - start:.2f}s")
        if output:
            cv2.imwrite(output_path(output, path, "", len(paths) == 1), overlay)
            if panel is not None:
                cv2.imwrite(output_path(output, path, "_score_maps", len(paths) == 1), panel)
        else:
            cv2.imshow("DenseCLIP", overlay)
            if cv2.waitKey(0) == 27:
                break


def _writes_video(fourcc: str, extension: str) -> bool:
    """Whether this OpenCV build can write a video with this codec and container."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "probe" + extension)
        stderr, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)  # OpenCV's FFmpeg reports a missing encoder on stderr: expected while probing
        os.close(devnull)
        try:
            writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), 30.0, (16, 16))
            opened = writer.isOpened()
            if opened:
                writer.write(np.zeros((16, 16, 3), np.uint8))
            writer.release()
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)
        return opened and os.path.getsize(path) > 0


@functools.lru_cache(maxsize=None)
def video_format():
    """(fourcc, extension) of the videos written: x264 in .mkv where OpenCV has it, else mp4v in .mp4
    (the choice of Detectron2's demo)."""
    return ("x264", ".mkv") if _writes_video("x264", ".mkv") else ("mp4v", ".mp4")


def video_output_path(output: str, input_name: str, extension: str) -> str:
    """The file a video is written to: ``output`` itself, with ``extension`` added when it has none, or,
    for a folder (an existing one, or a path ending in a separator), ``input_name`` in it. Creates the
    folder."""
    if os.path.isdir(output) or output.endswith(("/", os.sep)):
        path = os.path.join(output, os.path.splitext(os.path.basename(input_name))[0] + extension)
    else:
        path = output if os.path.splitext(output)[1] else output + extension
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return path


def run_on_video(demo, video, output, source):
    """Draw every frame of ``video``; write them to ``output`` (a file) or show them. Raises when no
    frame can be read or the file cannot be written, so that nothing fails silently."""
    if not video.isOpened():
        raise ValueError(f"{source}: OpenCV cannot open it as a video")
    fps = video.get(cv2.CAP_PROP_FPS) or 15
    writer, frames = None, 0
    if output:  # the probed codec for its own container, else mp4v (which OpenCV writes in .mp4, .mkv, .avi)
        fourcc = video_format()[0] if output.lower().endswith(video_format()[1]) else "mp4v"
    for frame in demo.run_on_video(video):
        frames += 1
        if output:
            if writer is None:
                writer = cv2.VideoWriter(output, cv2.VideoWriter_fourcc(*fourcc), fps, frame.shape[1::-1])
                if not writer.isOpened():
                    raise ValueError(
                        f"--output {output}: OpenCV cannot write this video format ({fourcc}); name the file "
                        f"with the extension {video_format()[1]}, or give a folder"
                    )
            writer.write(frame)
        else:
            cv2.imshow("DenseCLIP", frame)
            if cv2.waitKey(1) == 27:
                break
    if writer is not None:
        writer.release()
    video.release()
    if frames == 0:
        raise ValueError(f"{source}: no frame could be read (OpenCV cannot decode it)")
    if output and not (os.path.isfile(output) and os.path.getsize(output) > 0):
        raise ValueError(f"--output {output}: OpenCV wrote nothing; give a folder or a file ending in {video_format()[1]}")
    if output:
        print(f"{source}: {frames} frames written to {output}")


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="denseclip")
    setup_logger()
    cfg = get_denseclip_cfg(args.config_file, args.opts)
    register_datasets_from_config(cfg)
    cfg.freeze()
    vocabulary = None if args.vocabulary is None else parse_vocabulary(args.vocabulary)
    demo = VisualizationDemo(cfg, args.confidence_threshold, args.score_maps, vocabulary)
    if args.input:
        run_on_images(demo, expand_inputs(args.input), args.output)
    elif args.webcam:
        output = args.output and video_output_path(args.output, "webcam", video_format()[1])
        run_on_video(demo, cv2.VideoCapture(0), output, "--webcam")
    elif args.video_input:
        if not os.path.isfile(args.video_input):
            raise FileNotFoundError(f"--video-input: no such file: {args.video_input}")
        output = args.output and video_output_path(args.output, args.video_input, video_format()[1])
        run_on_video(demo, cv2.VideoCapture(args.video_input), output, args.video_input)
    else:
        raise SystemExit("Give --input, --video-input or --webcam")


if __name__ == "__main__":
    main()
