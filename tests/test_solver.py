import pytest
import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from denseclip.solver import build_optimizer

from helpers import tiny_detector_cfg, training_batch


@pytest.fixture
def model_and_optimizer():
    cfg = tiny_detector_cfg("mask_rcnn")
    cfg.SOLVER.BASE_LR = 1e-3
    torch.manual_seed(0)
    model = build_model(cfg)
    return cfg, model, build_optimizer(cfg, model)


def group_of(optimizer, param):
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


def test_parameter_groups(model_and_optimizer):
    cfg, model, optimizer = model_and_optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    image_encoder = model.backbone.bottom_up
    score_map = model.backbone.score_map
    text = score_map.text_encoder

    base = cfg.SOLVER.BASE_LR
    assert group_of(optimizer, image_encoder.layer1[0].conv1.weight)["lr"] == pytest.approx(0.1 * base)
    assert group_of(optimizer, image_encoder.attnpool.q_proj.weight)["lr"] == pytest.approx(0.1 * base)
    assert group_of(optimizer, text.contexts)["lr"] == pytest.approx(base)
    assert group_of(optimizer, score_map.gamma)["lr"] == pytest.approx(base)
    assert group_of(optimizer, model.backbone.neck.fpn_lateral5.weight)["lr"] == pytest.approx(base)

    # The release's rule: no weight decay exactly for parameters whose name contains "norm".
    names = {p: n for n, p in model.named_parameters()}
    decoder = score_map.context_decoder
    for param, decayed in (
        (decoder.layers[0].norm1.weight, False),
        (decoder.layers[0].norm3.bias, False),
        (decoder.memory_proj[0].weight, True),  # a LayerNorm, but named memory_proj.0
        (image_encoder.bn1.weight, True),  # the trained (Sync)BatchNorm, named bn1
        (image_encoder.layer1[0].bn3.bias, True),
        (model.backbone.neck.fpn_lateral5.weight, True),
        (text.contexts, True),
        (score_map.gamma, True),
    ):
        assert ("norm" not in names[param]) == decayed
        assert group_of(optimizer, param)["weight_decay"] == pytest.approx(1e-4 if decayed else 0.0), names[param]


def test_one_step_moves_parameters_by_their_learning_rate(model_and_optimizer):
    """AdamW's first step moves each element by lr * g / |g| (plus a decay of lr * 1e-4 * value): the
    largest move of a tensor is its group's learning rate, whatever the gradient clipping did."""
    cfg, model, optimizer = model_and_optimizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with EventStorage():
        losses = model(training_batch(with_masks=True))
    sum(losses.values()).backward()
    optimizer.step()
    after = dict(model.named_parameters())
    base = cfg.SOLVER.BASE_LR
    for name, lr in (
        ("backbone.score_map.gamma", base),
        ("backbone.neck.fpn_lateral5.weight", base),
        ("backbone.bottom_up.conv1.weight", 0.1 * base),
        ("backbone.bottom_up.attnpool.q_proj.weight", 0.1 * base),
    ):
        step = (after[name].detach() - before[name]).abs().max().item()
        assert step == pytest.approx(lr, rel=0.01), name


def test_full_model_gradient_clipping():
    cfg = tiny_detector_cfg("retinanet")
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.MOMENTUM = 0.0
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    cfg.SOLVER.BASE_LR = 1.0
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1  # full_model, as in the COCO configs
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    model = torch.nn.ParameterList(params)
    optimizer = build_optimizer(cfg, model)
    params[0].grad, params[1].grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    total = (9 * 3 + 16 * 4) ** 0.5
    optimizer.step()
    # SGD with lr 1: the update is the clipped gradient, whose norm over both tensors is 0.1.
    step = torch.cat([p.detach() for p in params]).neg()
    assert step.norm().item() == pytest.approx(0.1, rel=1e-5)
    torch.testing.assert_close(step[:3], torch.full((3,), 3.0 * 0.1 / total))


# ------------------------------------------------------------------------------------------------
# Semantic segmentation: the release's (MMSegmentation's) optimizer groups and poly schedule
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vit", [False, True])
def test_semantic_segmentation_parameter_groups(vit):
    """The release's mmcv rule: backbone (its ViT pyramid included) at 0.1 x lr; no weight decay only
    where a name of the release's model contains "norm": the context decoder's norm1-3, not the head's
    BatchNorms (named bn there, decayed)."""
    from helpers import tiny_sem_seg_cfg

    cfg = tiny_sem_seg_cfg(vit=vit)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    base, decay = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
    bottom_up = model.backbone.bottom_up
    layer = model.backbone.score_map.context_decoder.layers[0]
    head_norm = model.sem_seg_head.scale_heads[0][0].norm
    expected = [
        (head_norm.weight, base, decay),
        (model.sem_seg_head.predictor.weight, base, decay),
        (layer.norm1.weight, base, 0.0),
        (layer.norm3.bias, base, 0.0),
        (model.backbone.score_map.context_decoder.memory_proj[0].weight, base, decay),
        (model.backbone.neck.fpn_lateral5.weight, base, decay),
    ]
    if vit:
        expected += [(bottom_up.fpn1[1].weight, 0.1 * base, decay), (bottom_up.fpn3.weight, 0.1 * base, decay),
                     (bottom_up.vit.ln_pre.weight, 0.1 * base, decay)]
    else:
        expected += [(bottom_up.bn1.weight, 0.1 * base, decay), (bottom_up.attnpool.q_proj.weight, 0.1 * base, decay)]
    for param, lr, weight_decay in expected:
        group = group_of(optimizer, param)
        assert (group["lr"], group["weight_decay"]) == (pytest.approx(lr), pytest.approx(weight_decay))
    text = model.backbone.score_map.text_encoder
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(text.token_embedding.weight) not in in_optimizer and id(text.contexts) in in_optimizer


def test_poly_schedule_with_linear_warmup():
    """MMCV's poly with min_lr: lr(i) = (lr0 - min) (1 - i / N)^0.9 + min after warm-up; the warm-up
    rises linearly from 1e-6 x lr0 to the poly value at its end (Detectron2's WarmupParamScheduler; MMCV
    scales poly(i) by the rising factor instead, within 1% of this over the 1500 iterations)."""
    from denseclip.solver import build_lr_scheduler
    from helpers import tiny_sem_seg_cfg

    cfg = tiny_sem_seg_cfg()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.BACKBONE_MULTIPLIER = 80000, 0.1
    lr0, low, total, warmup = 1e-4, 1e-6, 80000, 1500
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)

    def poly(i):
        return (lr0 - low) * (1 - i / total) ** 0.9 + low

    for i in (0, 750, 1499, 1500, 1501, 20000, 40000, 79999):
        expected = 1e-6 * lr0 + i / warmup * (poly(warmup) - 1e-6 * lr0) if i < warmup else poly(i)
        assert lr0 * scheduler._multiplier(i / total) == pytest.approx(expected, rel=1e-6), i
        if 0 < i < warmup:
            release = poly(i) * (1e-6 + (1 - 1e-6) * i / warmup)
            assert expected == pytest.approx(release, rel=0.01)
    # The scheduler sets every group's lr: the image encoder's at 0.1 x.
    image_group = group_of(optimizer, model.backbone.bottom_up.bn1.weight)
    head_group = group_of(optimizer, model.sem_seg_head.predictor.weight)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert head_group["lr"] == pytest.approx(1e-6 * lr0 + 3 / warmup * (poly(warmup) - 1e-6 * lr0), rel=1e-6)
    assert image_group["lr"] == pytest.approx(0.1 * head_group["lr"], rel=1e-6)


@pytest.mark.parametrize("key", ["BASE_LR", "MAX_ITER"])
def test_poly_schedule_refuses_a_zero_lr_or_length_by_name(key):
    from denseclip.solver import build_lr_scheduler
    from helpers import tiny_sem_seg_cfg

    cfg = tiny_sem_seg_cfg()
    cfg.SOLVER.POLY_LR_MIN = 0.0
    optimizer = build_optimizer(cfg, build_model(cfg))
    cfg.SOLVER[key] = 0
    with pytest.raises(ValueError, match=r"needs SOLVER.BASE_LR > 0 and SOLVER.MAX_ITER > 0.*--eval-only"):
        build_lr_scheduler(cfg, optimizer)


@pytest.mark.parametrize("name", ["ADAMW", "SGD"])
def test_multi_tensor_updates_equal_torchs_per_tensor_loop(name):
    """Three steps of the project's optimizer (foreach kernels) against torch's own optimizer over
    the same parameter groups with its per-tensor loop (foreach=False): the same weights, bit for bit."""
    cfg = tiny_detector_cfg("mask_rcnn")
    cfg.SOLVER.OPTIMIZER, cfg.SOLVER.MOMENTUM = name, 0.9
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    torch.manual_seed(0)
    ours, reference = build_model(cfg), build_model(cfg)
    reference.load_state_dict(ours.state_dict())
    optimizer = build_optimizer(cfg, ours)
    assert all(group["foreach"] for group in optimizer.param_groups)
    index = {id(p): i for i, p in enumerate(ours.parameters())}
    reference_params = list(reference.parameters())
    groups = [{**{k: v for k, v in group.items() if k != "foreach"},
               "params": [reference_params[index[id(p)]] for p in group["params"]], "foreach": False}
              for group in optimizer.param_groups]
    torch_optimizer = (torch.optim.AdamW if name == "ADAMW" else torch.optim.SGD)(groups, lr=cfg.SOLVER.BASE_LR)
    start = [p.detach().clone() for p in ours.parameters()]
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(ours.parameters(), reference_params):
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=generator)
                q.grad = p.grad.clone()
        optimizer.step()
        torch_optimizer.step()
    assert sum(not torch.equal(p, s) for p, s in zip(ours.parameters(), start)) > 50  # the steps moved them
    for (param_name, p), q in zip(ours.named_parameters(), reference_params):
        assert torch.equal(p, q), param_name
