#!/usr/bin/env python
"""
Convert a checkpoint of the DenseCLIP release into a Detectron2 checkpoint of this project: a detector
(MMDetection 2.17: RetinaNet or Mask R-CNN on CLIP RN50 / RN101) or a semantic segmentor (MMSegmentation
0.19: Semantic FPN on ADE20K, CLIP RN50 / RN101 / ViT-B/16), DenseCLIP or its CLIP baseline.

    python tools/convert-denseclip-release-to-d2.py denseclip_fpn_res50.pth output/semantic_fpn_denseclip_R_50.pth
    python train_net.py --eval-only --config-file <the config it names> MODEL.WEIGHTS output/semantic_fpn_denseclip_R_50.pth

The layout is read from the checkpoint and stated; the model is built from the matching config of
configs/ (or --config-file); the checkpoint's class names (meta CLASSES) must be the config's, in its
order; every tensor is mapped onto the model by name and shape, or the conversion stops and says why.
(tools/convert-denseclip-mmdet-to-d2.py is the same tool under its former name.)
"""
import argparse
import os
import sys

import torch

import denseclip  # noqa: F401  (first, so that its warning filters also cover the notices Detectron2 raises on import)

from detectron2.modeling import build_model

from denseclip import get_denseclip_cfg
from denseclip.checkpoint import convert_release_state_dict, infer_release_layout, read_release_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The release's meta entries kept in the converted file.
KEPT_META = ("mmdet_version", "mmseg_version", "CLASSES", "PALETTE")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="the release's .pth file")
    parser.add_argument("output", help="the Detectron2 checkpoint to write (.pth)")
    parser.add_argument("--config-file", help="convert for this config (default: the one matching the checkpoint)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    args = parser.parse_args(argv)

    state, meta = read_release_checkpoint(args.input)
    try:
        layout = infer_release_layout(state)
        config_file = args.config_file or os.path.join(REPO, layout.config_file())
        if not os.path.isfile(config_file):
            raise ValueError(f"it holds a {layout}, but {config_file} does not exist: give --config-file")
    except ValueError as e:
        raise ValueError(f"{args.input}: {e}") from None
    cfg = get_denseclip_cfg(config_file, list(args.opts) + ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    try:
        converted, report = convert_release_state_dict(state, meta, model, cfg)
    except ValueError as e:
        raise ValueError(f"{args.input}: {e}") from None
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(
        {"model": converted, "__author__": "DenseCLIP release, converted", "source": os.path.abspath(args.input),
         "config": os.path.relpath(config_file, REPO), "release_meta": {k: meta[k] for k in KEPT_META if k in meta}},
        args.output,
    )
    print(f"{args.input}\n{report.summary()}\nConfig: {os.path.relpath(config_file, REPO)}\nWrote {args.output}")
    print(f"Evaluate: python train_net.py --eval-only --config-file {os.path.relpath(config_file, REPO)} "
          f"MODEL.WEIGHTS {args.output}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"Not converted: {e}")
