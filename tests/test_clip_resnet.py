import math

import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import FrozenBatchNorm2d

from denseclip.modeling import CLIPResNet
from denseclip.modeling.backbone.clip_resnet import resize_positional_grid

from helpers import tiny_detector_cfg


def tiny_resnet(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("input_resolution", 64)
    model = CLIPResNet([1, 1, 1, 1], width=8, embed_dim=32, norm="BN", **kwargs).eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model


def direct_attention_pool(pool, res5, grid):
    """Every location's token attends to [mean token; all tokens], written out head by head."""
    b, c, h, w = res5.shape
    tokens = res5.flatten(2).transpose(1, 2)  # B x HW x C
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + grid
    heads, d = pool.num_heads, c // pool.num_heads
    q = (tokens @ pool.q_proj.weight.T + pool.q_proj.bias).view(b, -1, heads, d)
    k = (tokens @ pool.k_proj.weight.T + pool.k_proj.bias).view(b, -1, heads, d)
    v = (tokens @ pool.v_proj.weight.T + pool.v_proj.bias).view(b, -1, heads, d)
    attention = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d), dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", attention, v).reshape(b, -1, c)
    out = out @ pool.c_proj.weight.T + pool.c_proj.bias
    return out[:, 0], out[:, 1:].transpose(1, 2).reshape(b, -1, h, w)


def test_output_shape_matches_features():
    model = tiny_resnet()
    features = model(torch.randn(2, 3, 96, 64))
    for name, spec in model.output_shape().items():
        assert features[name].shape == (2, spec.channels, 96 // spec.stride, 64 // spec.stride)
    assert [s.stride for s in model.output_shape().values()] == [4, 8, 16, 32]
    assert [s.channels for s in model.output_shape().values()] == [32, 64, 128, 256]


def test_dense_embedding_is_attention_at_every_location():
    model = tiny_resnet()  # 64 px -> 2 x 2 grid
    res5 = torch.randn(2, 256, 2, 2)
    with torch.no_grad():
        global_embedding, dense = model.attention_pool(res5)
        expected_global, expected_dense = direct_attention_pool(
            model.attnpool, res5, model.attnpool.positional_embedding
        )
        clip_global = model.attnpool(res5)  # open_clip's own forward: the global token only
    assert dense.shape == (2, 32, 2, 2)
    torch.testing.assert_close(dense, expected_dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(global_embedding, expected_global, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(global_embedding, clip_global, rtol=1e-5, atol=1e-6)


def test_smaller_feature_map_uses_top_left_of_grid():
    model = tiny_resnet(input_resolution=128)  # 4 x 4 grid
    res5 = torch.randn(1, 256, 2, 3)
    grid = model.attnpool.positional_embedding
    top_left = torch.cat([grid[:1], grid[1:].view(4, 4, -1)[:2, :3].reshape(6, -1)])
    with torch.no_grad():
        _, dense = model.attention_pool(res5)
        _, expected = direct_attention_pool(model.attnpool, res5, top_left)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-5)


def test_feature_map_larger_than_grid_interpolates():
    model = tiny_resnet()  # 2 x 2 grid, 5 x 3 feature map
    image = torch.randn(1, 3, 160, 96)
    with torch.no_grad():
        res5 = model(image)["res5"]
        _, dense = model.attention_pool(res5)
    assert res5.shape[-2:] == (5, 3) and dense.shape == (1, 32, 5, 3)
    assert torch.isfinite(dense).all()
    # Both sides exceed the grid: it is interpolated to 5 x 3 and used whole.
    grid = resize_positional_grid(model.attnpool.positional_embedding, (5, 3))
    with torch.no_grad():
        _, expected = direct_attention_pool(model.attnpool, res5, grid)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-5)


def test_frozen_batchnorm_by_default_and_freeze_at():
    model = CLIPResNet([1, 1, 1, 1], width=8, embed_dim=32, input_resolution=64)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert not any(k.endswith("num_batches_tracked") for k in model.state_dict())

    model = CLIPResNet([1, 1, 1, 1], width=8, embed_dim=32, input_resolution=64, norm="BN", freeze_at=2)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("conv", "bn", "layer1.")) for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(("layer2", "layer4")))
    assert isinstance(model.bn1, FrozenBatchNorm2d) and isinstance(model.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(model.layer2[0].bn1, torch.nn.BatchNorm2d)


def test_without_attention_pool():
    model = CLIPResNet([1, 1, 1, 1], width=8, embed_dim=32, with_attention_pool=False)
    assert model.attnpool is None
    with pytest.raises(RuntimeError, match="without its attention pool"):
        model.attention_pool(torch.randn(1, 256, 1, 1))


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "layers, embed_dim, trunk_millions",
    [([3, 4, 6, 3], 1024, 23.5), ([3, 4, 23, 3], 512, 42.5)],
    ids=["RN50", "RN101"],
)
def test_full_size_shapes_and_parameter_counts(layers, embed_dim, trunk_millions):
    model = CLIPResNet(layers, width=64, embed_dim=embed_dim, input_resolution=1344, norm="BN")
    grid = model.attnpool.positional_embedding
    assert grid.shape == (42 * 42 + 1, 2048)
    trunk = count(model) - count(model.attnpool)
    pool_without_grid = count(model.attnpool) - grid.numel()
    assert trunk / 1e6 == pytest.approx(trunk_millions, rel=0.01)
    # q, k, v: 2048 x 2048 (+ bias); c_proj: 2048 x embed_dim (+ bias)
    assert pool_without_grid == 3 * (2048 * 2048 + 2048) + 2048 * embed_dim + embed_dim
    with torch.no_grad():
        features = model.eval()(torch.zeros(1, 3, 64, 96))
    assert features["res5"].shape == (1, 2048, 2, 3)


def test_coco_configs_train_synchronised_batchnorm():
    """The release converts the image encoder's BatchNorm to SyncBN and trains it: torch's
    SyncBatchNorm on GPUs; on CPU, where it has no kernel, Detectron2's NaiveSyncBatchNorm (gloo)."""
    from detectron2.layers import NaiveSyncBatchNorm

    from denseclip.modeling.backbone.clip_resnet import clip_norm

    cfg = tiny_detector_cfg("mask_rcnn")
    assert cfg.MODEL.CLIP.NORM == "SyncBN" and clip_norm(cfg) == "naiveSyncBN"
    cfg.MODEL.DEVICE = "cuda"
    assert clip_norm(cfg) == "SyncBN"
    model = CLIPResNet([1, 1, 1, 1], width=8, embed_dim=32, input_resolution=64, norm="SyncBN")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is torch.nn.SyncBatchNorm for m in norms)
    model = CLIPResNet([1, 1, 1, 1], width=8, embed_dim=32, input_resolution=64, norm="naiveSyncBN")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is NaiveSyncBatchNorm for m in norms)
    assert all(m.weight.requires_grad for m in norms)
