"""
Config keys added by DenseCLIP, one small function per concern, each key with a default and a comment:
CLIP's encoders (MODEL.CLIP), language guidance (MODEL.DENSECLIP), the heads' release options, own
data (DATASETS.*), the segmentation input pipeline (INPUT.*) and the solver.
"""
from typing import Sequence

import torch

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg


def add_denseclip_config(cfg) -> None:
    """Add DenseCLIP's keys to a Detectron2 config, in place."""
    add_clip_config(cfg)
    add_language_guidance_config(cfg)
    add_head_config(cfg)
    add_dataset_config(cfg)
    add_input_config(cfg)
    add_solver_config(cfg)


def add_clip_config(cfg) -> None:
    """MODEL.CLIP: CLIP's image encoder (modified ResNet, defaults CLIP RN50; RN101 sets LAYERS and
    EMBED_DIM), its vision transformer (VIT) and its text encoder (TEXT)."""
    cfg.MODEL.CLIP = CN()
    # Blocks per stage res2..res5: [3, 4, 6, 3] for RN50, [3, 4, 23, 3] for RN101.
    cfg.MODEL.CLIP.LAYERS = [3, 4, 6, 3]
    # Stem width; stage widths are 4x, 8x, 16x, 32x this (256..2048 for 64).
    cfg.MODEL.CLIP.WIDTH = 64
    # CLIP's joint embedding size: 1024 for RN50, 512 for RN101.
    cfg.MODEL.CLIP.EMBED_DIM = 1024
    # Input resolution the attention pool's positional grid is built for (1344 -> 42 x 42 grid).
    cfg.MODEL.CLIP.INPUT_RESOLUTION = 1344
    # Normalisation of the image encoder: "SyncBN" (trained and synchronised across processes, as the
    # release trains; torch's SyncBatchNorm on GPUs, Detectron2's NaiveSyncBatchNorm on CPU), "BN",
    # or "FrozenBN" (CLIP's statistics and affine parameters kept fixed).
    cfg.MODEL.CLIP.NORM = "SyncBN"
    # Freeze the stem (1) and stages res2.. (2..5) like MODEL.BACKBONE.FREEZE_AT; 0 trains all.
    cfg.MODEL.CLIP.FREEZE_AT = 0
    # Image-encoder features handed to the FPN.
    cfg.MODEL.CLIP.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Activation of CLIP's transformers: "QuickGELU" (every OpenAI CLIP model) or "GELU" (open_clip
    # models trained without the "-quickgelu" suffix).
    cfg.MODEL.CLIP.ACTIVATION = "QuickGELU"
    # How the attention pool's positional grid meets a feature map of another size: "crop" its top-left
    # part (the detection release), or "resize" the whole grid bilinearly (the segmentation release).
    cfg.MODEL.CLIP.ATTENTION_POOL_GRID = "crop"

    # CLIP vision transformer (the *_clip_vit_* backbones). Defaults are CLIP ViT-B/16; EMBED_DIM (512
    # for ViT-B/16), INPUT_RESOLUTION (the pretraining grid: 224 -> 14 x 14) and ACTIVATION are shared.
    cfg.MODEL.CLIP.VIT = CN()
    # Side of the square patches: the stride of the transformer's feature map (a power of 2 for the pyramid).
    cfg.MODEL.CLIP.VIT.PATCH_SIZE = 16
    # Token width (768 for ViT-B).
    cfg.MODEL.CLIP.VIT.WIDTH = 768
    # Number of transformer blocks.
    cfg.MODEL.CLIP.VIT.LAYERS = 12
    # Attention heads per block.
    cfg.MODEL.CLIP.VIT.HEADS = 12
    # Stochastic depth in training: drop rate of the last block's residual branches, 0 for the first, linear between.
    cfg.MODEL.CLIP.VIT.DROP_PATH_RATE = 0.0
    # Segmentation pyramid (build_*_clip_vit_fpn_backbone): the 0-based blocks whose patch tokens become
    # the stride-4, 8, 16 and 32 maps (upsampled x4 and x2, kept, max-pooled), as the release's ViT-B.
    cfg.MODEL.CLIP.VIT.OUT_INDICES = [3, 5, 7, 11]
    # Normalisation between the two transposed convolutions of that pyramid's stride-4 branch.
    cfg.MODEL.CLIP.VIT.PYRAMID_NORM = "SyncBN"
    # Add class_embedding to the class token's positional embedding too (so the token gets it twice),
    # as the release's segmentation ViT does; CLIP itself (False) adds it once.
    cfg.MODEL.CLIP.VIT.CLASS_EMBEDDING_IN_POSITION = False

    # CLIP text encoder (frozen transformer). Defaults are CLIP's, shared by RN50 and RN101.
    cfg.MODEL.CLIP.TEXT = CN()
    cfg.MODEL.CLIP.TEXT.WIDTH = 512
    cfg.MODEL.CLIP.TEXT.HEADS = 8
    cfg.MODEL.CLIP.TEXT.LAYERS = 12
    cfg.MODEL.CLIP.TEXT.VOCAB_SIZE = 49408


def add_language_guidance_config(cfg) -> None:
    """MODEL.DENSECLIP: pixel-text score maps concatenated to a backbone feature, the auxiliary loss."""
    cfg.MODEL.DENSECLIP = CN()
    # Whether the backbone builders add language guidance (attention pool embeddings, text encoder,
    # context decoder, score map). The DenseCLIP meta-architectures (DenseCLIPRetinaNet, DenseCLIPRCNN,
    # DenseCLIPSemanticSegmentor) set it when they build their backbone, so MODEL.META_ARCHITECTURE alone
    # decides: with the stock RetinaNet, GeneralizedRCNN or SlidingWindowSemanticSegmentor the same
    # builders give the "CLIP" baselines. Configs leave it False.
    cfg.MODEL.DENSECLIP.LANGUAGE_GUIDED = False
    # Class names for the prompts; empty takes the thing_classes of DATASETS.TRAIN[0].
    cfg.MODEL.DENSECLIP.CLASS_NAMES = []
    # Token positions per class name: start token, the name's BPE tokens, end token.
    cfg.MODEL.DENSECLIP.PROMPT_LENGTH = 5
    # Learnable context vectors inserted after the start token.
    cfg.MODEL.DENSECLIP.NUM_CONTEXT = 8
    # Temperature of the pixel-text score map (cosine similarity / TAU).
    cfg.MODEL.DENSECLIP.TAU = 0.07
    # The bottom-up feature the score map is concatenated to; "" takes the one of the largest stride
    # (res5). The release's segmentation ViT-B uses its stride-16 map ("s16").
    cfg.MODEL.DENSECLIP.SCORE_CONCAT_FEATURE = ""
    # Concatenate the score map divided by TAU (the detection release) or the plain cosine similarity
    # (False, the segmentation release). The auxiliary loss always reads cosine / TAU.
    cfg.MODEL.DENSECLIP.SCORE_CONCAT_WITH_TAU = True
    # Initial value of the learnable per-channel scale of the context decoder's update.
    cfg.MODEL.DENSECLIP.GAMMA_INIT = 1e-4
    # Cache the text encoder's output in eval mode (it only depends on the learned contexts).
    cfg.MODEL.DENSECLIP.CACHE_TEXT_EMBEDDINGS = True
    # DenseCLIP on any Detectron2 backbone (build_attention_pool_fpn_backbone and its RetinaNet
    # version): the bottom-up's builder, and a new attention pool on its top feature that maps it to
    # MODEL.CLIP.EMBED_DIM (grid MODEL.CLIP.INPUT_RESOLUTION / 32) with this many heads.
    cfg.MODEL.DENSECLIP.BOTTOM_UP = "build_resnet_backbone"
    cfg.MODEL.DENSECLIP.ATTENTION_POOL_HEADS = 32
    # A CLIP checkpoint for the text encoder when MODEL.WEIGHTS holds no text encoder (e.g. ImageNet
    # weights of the image backbone); "" takes the text encoder from MODEL.WEIGHTS.
    cfg.MODEL.DENSECLIP.TEXT_WEIGHTS = ""
    # Inference also returns "score_maps" (K x H x W logits on the original image) per image; the
    # evaluator then also measures how well they locate each class (ScoreMapEvaluator).
    cfg.MODEL.DENSECLIP.RETURN_SCORE_MAPS = False

    # Context decoder (vision-to-language prompting): text embeddings attend to the image.
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER = CN()
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.WIDTH = 256
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.HEADS = 4
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.LAYERS = 3
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.DROPOUT = 0.1

    # Auxiliary loss on the score map (ScoreMapLoss), for all three tasks.
    cfg.MODEL.DENSECLIP.SCORE_MAP_LOSS = CN()
    cfg.MODEL.DENSECLIP.SCORE_MAP_LOSS.WEIGHT = 1.0
    # The targets the score map (cosine / TAU) is trained against; "" takes the task's own, as the
    # release: "box" for detectors, "label_map" for semantic segmentors.
    # Detectors: binary cross-entropy per class on a grid of STRIDE, over the cells some object covers;
    # "box" is the release's rule (cells floor(x1/4) .. floor(x2/4) - 1, so a box inside one cell covers
    # none; also for Mask R-CNN), "box_overlap" every cell the box overlaps, "mask" every cell the instance
    # mask touches. Semantic segmentors: "label_map", cross-entropy of the score map resized to the label
    # map, averaged as MODEL.SEM_SEG_HEAD.LOSS_NORMALIZATION says.
    cfg.MODEL.DENSECLIP.SCORE_MAP_LOSS.TARGET = ""
    # Stride of the detectors' target grid the score map is upsampled to (4 = res2, as in the release).
    cfg.MODEL.DENSECLIP.SCORE_MAP_LOSS.STRIDE = 4


def add_head_config(cfg) -> None:
    """The release's options of Detectron2's FPN, RetinaNet and semantic FPN head, and the semantic
    segmentors' test (TEST.SEM_SEG, TEST.AUG.SCALE_RATIOS)."""
    # RetinaNet's P7 = conv(relu(P6)) as in Detectron2 (True), or conv(P6) as in the release's
    # MMDetection FPN (False).
    cfg.MODEL.FPN.RELU_BEFORE_P7 = False
    # DenseCLIPRetinaNet clips its boxes to the image before NMS, as the release (MMDetection) does;
    # False keeps Detectron2's order (NMS, then clipping), which the stock RetinaNet uses.
    cfg.MODEL.RETINANET.CLIP_BOXES_BEFORE_NMS = True
    # Dropout2d rate before the 1x1 classifier of SemanticFPNHead (0.1 in the release's head).
    cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.0
    # How label-map cross-entropies are averaged: "valid" pixels only (Detectron2), or "all" pixels,
    # ignored ones counting 0 (MMSegmentation 0.19, the release).
    cfg.MODEL.SEM_SEG_HEAD.LOSS_NORMALIZATION = "valid"
    # Inference: "whole" image (Detectron2), or "slide" crops of CROP_SIZE (h, w) every STRIDE (h, w)
    # pixels, the last one aligned to the border, overlapping logits averaged (the release).
    cfg.TEST.SEM_SEG = CN()
    cfg.TEST.SEM_SEG.MODE = "whole"
    cfg.TEST.SEM_SEG.CROP_SIZE = (512, 512)
    cfg.TEST.SEM_SEG.STRIDE = (341, 341)
    # Multi-scale test of semantic segmentors (TEST.AUG.ENABLED): test resizes to these ratios of
    # (MIN_SIZE_TEST, MAX_SIZE_TEST), both scaled, as the release; empty uses TEST.AUG.MIN_SIZES and
    # TEST.AUG.MAX_SIZE. Probabilities (softmax) are averaged over scales and flips.
    cfg.TEST.AUG.SCALE_RATIOS = []


def add_dataset_config(cfg) -> None:
    """Own data without code (DATASETS.COCO_FORMAT, DATASETS.SEM_SEG_FOLDERS)."""
    # An annotation JSON and the folder of its images per split. When set, they are registered as
    # "coco_format_train" / "coco_format_test" and replace DATASETS.TRAIN / DATASETS.TEST; class names
    # come from the JSON's categories.
    cfg.DATASETS.COCO_FORMAT = CN()
    cfg.DATASETS.COCO_FORMAT.TRAIN_JSON = ""
    cfg.DATASETS.COCO_FORMAT.TRAIN_IMAGES = ""
    cfg.DATASETS.COCO_FORMAT.TEST_JSON = ""
    cfg.DATASETS.COCO_FORMAT.TEST_IMAGES = ""
    # Semantic segmentation: per split a folder of images and a folder of label maps (single-channel PNGs
    # of class indices, MODEL.SEM_SEG_HEAD.IGNORE_VALUE for pixels to ignore), matched by file name. When
    # set, they are registered as "sem_seg_folders_train" / "sem_seg_folders_test" and replace
    # DATASETS.TRAIN / DATASETS.TEST.
    cfg.DATASETS.SEM_SEG_FOLDERS = CN()
    cfg.DATASETS.SEM_SEG_FOLDERS.TRAIN_IMAGES = ""
    cfg.DATASETS.SEM_SEG_FOLDERS.TRAIN_LABELS = ""
    cfg.DATASETS.SEM_SEG_FOLDERS.TEST_IMAGES = ""
    cfg.DATASETS.SEM_SEG_FOLDERS.TEST_LABELS = ""
    # Class names of the label values 0, 1, ..., in order; each is a text prompt (at most 3 BPE tokens).
    cfg.DATASETS.SEM_SEG_FOLDERS.CLASS_NAMES = []


def add_input_config(cfg) -> None:
    """The input pipeline: how images are resized, and the semantic segmentors' (SemSegDatasetMapper)
    release pipeline of training resize, crop, flip and photometric distortion. Testing resizes with
    INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST (the release: 512 / 2048)."""
    # How every resize of an image interpolates (training and test mappers, multi-scale testing, the
    # predictor and demo, exported graphs' runner): "pil", Detectron2's ResizeTransform (PIL's
    # antialiasing bilinear filter for uint8 images); or "opencv", the release's cv2.resize (INTER_LINEAR
    # images, INTER_NEAREST label maps, as MMCV's imrescale). The output size is the same with both.
    cfg.INPUT.RESIZE_BACKEND = "pil"
    # Training resize (long, short): a ratio r is drawn from SCALE_RATIO_RANGE_TRAIN and the image is
    # scaled, keeping its aspect ratio, to the largest size whose long side is at most r x SCALE_TRAIN[0]
    # and short side at most r x SCALE_TRAIN[1].
    cfg.INPUT.SCALE_TRAIN = (2048, 512)
    cfg.INPUT.SCALE_RATIO_RANGE_TRAIN = (0.5, 2.0)
    # A training crop (INPUT.CROP) is redrawn, up to 10 times, until no class covers this fraction or
    # more of its pixels (IGNORE_VALUE pixels not counted); 1.0 takes any crop. Absolute crops are then
    # padded to INPUT.CROP.SIZE (image with the pixel mean, labels with IGNORE_VALUE).
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # Photometric distortion (MMSegmentation's PhotoMetricDistortion), each step with probability 0.5.
    cfg.INPUT.PHOTOMETRIC_DISTORTION = CN()
    cfg.INPUT.PHOTOMETRIC_DISTORTION.ENABLED = False
    # Brightness: add a uniform value in [-delta, delta] to every channel.
    cfg.INPUT.PHOTOMETRIC_DISTORTION.BRIGHTNESS_DELTA = 32
    # Contrast: multiply every channel by a uniform value in this range.
    cfg.INPUT.PHOTOMETRIC_DISTORTION.CONTRAST_RANGE = (0.5, 1.5)
    # Saturation: multiply HSV's S by a uniform value in this range.
    cfg.INPUT.PHOTOMETRIC_DISTORTION.SATURATION_RANGE = (0.5, 1.5)
    # Hue: add an integer in [-delta, delta) to OpenCV's H (0-179, units of 2 degrees).
    cfg.INPUT.PHOTOMETRIC_DISTORTION.HUE_DELTA = 18


def add_solver_config(cfg) -> None:
    """Solver additions for the release's recipe."""
    # "SGD" or "ADAMW".
    cfg.SOLVER.OPTIMIZER = "SGD"
    # Learning-rate multiplier of the CLIP image encoder (its attention pool included).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    # Parameters whose name contains one of these get no weight decay (the release: "norm", which
    # its context decoder's LayerNorms match and the image encoder's BatchNorms, named bn*, do not).
    cfg.SOLVER.NO_WEIGHT_DECAY_KEYS = []
    # SOLVER.LR_SCHEDULER_NAME "WarmupPolyLR": lr x (1 - iter / MAX_ITER)^POWER, decaying to POLY_LR_MIN at
    # the end (for BASE_LR; every group ends at the same fraction of its own lr), after SOLVER.WARMUP_*.
    cfg.SOLVER.POLY_LR_POWER = 0.9
    cfg.SOLVER.POLY_LR_MIN = 0.0


def get_denseclip_cfg(config_file: str = "", opts: Sequence[str] = ()) -> CN:
    """
    Detectron2's default config with DenseCLIP's keys, merged from ``config_file`` and ``KEY VALUE``
    overrides. Not frozen. (Tools that read data then call ``register_datasets_from_config(cfg)``.)
    """
    cfg = get_cfg()
    add_denseclip_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def check_device(cfg) -> None:
    """Refuse a CUDA MODEL.DEVICE on a machine where PyTorch finds no GPU, with the fix, before
    anything is built (PyTorch's own error names the driver, not the config key)."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE} but no GPU is available: add MODEL.DEVICE cpu")
