"""Small models and configs that keep the test suite fast on a CPU."""
import open_clip
import torch

from detectron2.config import get_cfg

from denseclip import add_denseclip_config

TINY_CLIP = dict(layers=[1, 1, 1, 1], width=8, embed_dim=32, text_width=32, text_heads=2, text_layers=1)


def tiny_open_clip(seed: int = 0, layers=None) -> torch.nn.Module:
    """A CLIP-shaped open_clip model small enough for unit tests (random weights)."""
    from conftest import randomize_batchnorm

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(
        embed_dim=TINY_CLIP["embed_dim"],
        vision_cfg=dict(layers=list(layers or TINY_CLIP["layers"]), width=TINY_CLIP["width"], image_size=64),
        text_cfg=dict(
            context_length=77,
            vocab_size=49408,
            width=TINY_CLIP["text_width"],
            heads=TINY_CLIP["text_heads"],
            layers=TINY_CLIP["text_layers"],
        ),
    )
    return randomize_batchnorm(model, seed).eval()


def tiny_cfg(denseclip: bool = True, class_names=("cat", "dog", "traffic light")):
    """A Detectron2 config for a tiny CLIP-FPN (matches tiny_open_clip's shapes)."""
    cfg = get_cfg()
    add_denseclip_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.CLIP.LAYERS = TINY_CLIP["layers"]
    cfg.MODEL.CLIP.WIDTH = TINY_CLIP["width"]
    cfg.MODEL.CLIP.EMBED_DIM = TINY_CLIP["embed_dim"]
    cfg.MODEL.CLIP.INPUT_RESOLUTION = 64
    cfg.MODEL.CLIP.TEXT.WIDTH = TINY_CLIP["text_width"]
    cfg.MODEL.CLIP.TEXT.HEADS = TINY_CLIP["text_heads"]
    cfg.MODEL.CLIP.TEXT.LAYERS = TINY_CLIP["text_layers"]
    cfg.MODEL.DENSECLIP.ENABLED = denseclip
    cfg.MODEL.DENSECLIP.CLASS_NAMES = list(class_names)
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.WIDTH = 16
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.HEADS = 2
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.LAYERS = 1
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    return cfg


DETECTOR_CONFIGS = {
    "retinanet": "configs/COCO-Detection/retinanet_denseclip_R_50_FPN_1x.yaml",
    "mask_rcnn": "configs/COCO-InstanceSegmentation/mask_rcnn_denseclip_R_50_FPN_1x.yaml",
}


def tiny_detector_cfg(kind: str = "retinanet", class_names=("cat", "dog", "traffic light")):
    """A real COCO config of the repository, shrunk to a tiny CLIP, tiny heads and small inputs."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = tiny_cfg(denseclip=True, class_names=class_names)
    cfg.merge_from_file(os.path.join(root, DETECTOR_CONFIGS[kind]))
    shrunk = tiny_cfg(denseclip=True, class_names=class_names)
    cfg.MODEL.CLIP.merge_from_other_cfg(shrunk.MODEL.CLIP)
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.merge_from_other_cfg(shrunk.MODEL.DENSECLIP.CONTEXT_DECODER)
    cfg.MODEL.CLIP.OUT_FEATURES = list(cfg.MODEL.FPN.IN_FEATURES)
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RETINANET.NUM_CLASSES = cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(class_names)
    cfg.MODEL.RETINANET.NUM_CONVS = 1
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 96
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 96
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg
