#!/usr/bin/env python
"""
Train and evaluate DenseCLIP (and its CLIP baselines) with Detectron2.

    python train_net.py --config-file configs/COCO-Detection/retinanet_denseclip_R_50_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file <config> --eval-only MODEL.WEIGHTS output/model_final.pth
"""
import denseclip  # noqa: F401  (first, so that its warning filters also cover the notices Detectron2 raises on import)

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from denseclip import DenseCLIPCheckpointer, check_device, get_denseclip_cfg, register_datasets_from_config
from denseclip.engine import DenseCLIPTrainer


def setup(args):
    cfg = get_denseclip_cfg(args.config_file, args.opts)
    try:
        # DATASETS.COCO_FORMAT.*, DATASETS.SEM_SEG_FOLDERS.*: own data without code; ADE20K checked as prepared
        register_datasets_from_config(cfg)
        check_device(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e))  # the message alone, no traceback: it says what to do
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="denseclip")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = DenseCLIPTrainer.build_model(cfg)
        checkpointer = DenseCLIPCheckpointer(model, cfg.OUTPUT_DIR, text_weights=cfg.MODEL.DENSECLIP.TEXT_WEIGHTS)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = DenseCLIPTrainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:  # multi-scale + flip test of semantic segmentors
            results.update(DenseCLIPTrainer.test_with_TTA(cfg, model))
        return results
    trainer = DenseCLIPTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
