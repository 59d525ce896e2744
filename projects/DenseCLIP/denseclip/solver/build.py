"""The release's optimizer: AdamW (or SGD), no decay on norm layers, CLIP image encoder at a reduced lr,
frozen text encoder, optional gradient clipping over the whole model; and its poly schedule."""
import itertools
from typing import Type

import torch
from fvcore.common.param_scheduler import ParamScheduler

from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver import build_lr_scheduler as build_detectron2_lr_scheduler
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping, reduce_param_groups

from ..modeling.backbone import AttentionPooledBackbone, CLIPResNet, CLIPVisionTransformer, CLIPViTFeaturePyramid

# Pretrained image encoders, trained at SOLVER.BACKBONE_MULTIPLIER x the base learning rate (the segmentation
# ViT's pyramid too, as the release's backbone holds it).
IMAGE_ENCODERS = (CLIPResNet, CLIPVisionTransformer, CLIPViTFeaturePyramid)

__all__ = ["PolynomialDecayToMinParamScheduler", "build_lr_scheduler", "build_optimizer"]


def _with_full_model_gradient_clipping(optimizer_type: Type[torch.optim.Optimizer], max_norm: float, norm_type: float):
    """An optimizer class that clips the gradient norm of all its parameters together before each step."""

    class FullModelGradientClipping(optimizer_type):
        def step(self, closure=None):
            params = itertools.chain(*(group["params"] for group in self.param_groups))
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = optimizer_type.__name__ + "WithFullModelGradientClipping"
    return FullModelGradientClipping


def _without_weight_decay(param_groups, model: torch.nn.Module, keys):
    """The groups, with weight decay 0 for every parameter whose name contains one of ``keys``."""
    if not keys:
        return param_groups
    names = {param: name for name, param in model.named_parameters()}
    split = []
    for group in param_groups:
        for param in group["params"]:
            single = {**group, "params": [param]}
            if any(key in names[param] for key in keys):
                single["weight_decay"] = 0.0
            split.append(single)
    return reduce_param_groups(split)


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """
    Parameter groups: the pretrained image encoder (a CLIP one with its attention pool; any other
    backbone without the new attention pool DenseCLIP puts on it) at SOLVER.BASE_LR x
    SOLVER.BACKBONE_MULTIPLIER, norm layers with SOLVER.WEIGHT_DECAY_NORM, parameters whose name contains
    one of SOLVER.NO_WEIGHT_DECAY_KEYS without weight decay, frozen parameters (the CLIP
    text encoder, frozen stages) left out. SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model" clips the
    norm of all gradients together; "value" and "norm" are Detectron2's per-parameter clipping.
    """
    image_encoders = tuple(
        f"{name}.net." if isinstance(module, AttentionPooledBackbone) else f"{name}."
        for name, module in model.named_modules()
        if isinstance(module, (*IMAGE_ENCODERS, AttentionPooledBackbone))
    )

    def lr_factor(param_name: str) -> float:
        return cfg.SOLVER.BACKBONE_MULTIPLIER if param_name.startswith(image_encoders) else 1.0

    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        lr_factor_func=lr_factor,
    )
    params = _without_weight_decay(params, model, cfg.SOLVER.NO_WEIGHT_DECAY_KEYS)
    name = cfg.SOLVER.OPTIMIZER.upper()
    # foreach: one multi-tensor kernel per update operation instead of one small operation per
    # parameter tensor. PyTorch does so by itself on GPUs; on CPUs it is the same arithmetic, with
    # results identical to the per-tensor loop, and about 1.3x faster for the RN50 detectors.
    if name == "SGD":
        optimizer_type = torch.optim.SGD
        kwargs = dict(momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV, foreach=True)
    elif name == "ADAMW":
        optimizer_type, kwargs = torch.optim.AdamW, dict(foreach=True)
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be SGD or ADAMW, got {cfg.SOLVER.OPTIMIZER!r}")

    clipping = cfg.SOLVER.CLIP_GRADIENTS
    if clipping.ENABLED and clipping.CLIP_TYPE == "full_model":
        optimizer_type = _with_full_model_gradient_clipping(optimizer_type, clipping.CLIP_VALUE, clipping.NORM_TYPE)
        return optimizer_type(params, lr=cfg.SOLVER.BASE_LR, **kwargs)
    return maybe_add_gradient_clipping(cfg, optimizer_type)(params, lr=cfg.SOLVER.BASE_LR, **kwargs)


class PolynomialDecayToMinParamScheduler(ParamScheduler):
    """MMCV's poly rule as a multiplier: (1 - minimum) * (1 - where)^power + minimum, where in [0, 1)."""

    def __init__(self, power: float, minimum: float):
        self.power = power
        self.minimum = minimum

    def __call__(self, where: float) -> float:
        return (1.0 - self.minimum) * (1.0 - where) ** self.power + self.minimum


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """
    SOLVER.LR_SCHEDULER_NAME "WarmupPolyLR": the release's segmentation schedule, lr x ((1 - m) (1 -
    iter / MAX_ITER)^POLY_LR_POWER + m) with m = POLY_LR_MIN / BASE_LR, after Detectron2's warm-up
    (SOLVER.WARMUP_METHOD from WARMUP_FACTOR x lr over WARMUP_ITERS). Other names are Detectron2's.
    """
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupPolyLR":
        return build_detectron2_lr_scheduler(cfg, optimizer)
    if cfg.SOLVER.BASE_LR <= 0 or cfg.SOLVER.MAX_ITER <= 0:
        raise ValueError(
            f"The poly schedule needs SOLVER.BASE_LR > 0 and SOLVER.MAX_ITER > 0, got {cfg.SOLVER.BASE_LR} and "
            f"{cfg.SOLVER.MAX_ITER}; to evaluate without training use train_net.py --eval-only"
        )
    if not 0.0 <= cfg.SOLVER.POLY_LR_MIN <= cfg.SOLVER.BASE_LR:
        raise ValueError(
            f"SOLVER.POLY_LR_MIN ({cfg.SOLVER.POLY_LR_MIN}) must lie between 0 and SOLVER.BASE_LR ({cfg.SOLVER.BASE_LR})"
        )
    poly = PolynomialDecayToMinParamScheduler(cfg.SOLVER.POLY_LR_POWER, cfg.SOLVER.POLY_LR_MIN / cfg.SOLVER.BASE_LR)
    schedule = WarmupParamScheduler(
        poly,
        cfg.SOLVER.WARMUP_FACTOR,
        min(cfg.SOLVER.WARMUP_ITERS / cfg.SOLVER.MAX_ITER, 1.0),
        cfg.SOLVER.WARMUP_METHOD,
        cfg.SOLVER.RESCALE_INTERVAL,
    )
    return LRMultiplier(optimizer, multiplier=schedule, max_iter=cfg.SOLVER.MAX_ITER)
