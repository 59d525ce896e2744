import pytest
import torch

from detectron2.layers import FrozenBatchNorm2d

from denseclip.modeling.backbone import dense_attention_pool

from helpers import clip_resnet, count_parameters, tiny_detector_cfg, tiny_resnet


def test_output_shape_matches_features():
    model = tiny_resnet()
    features = model(torch.randn(2, 3, 96, 64))
    for name, spec in model.output_shape().items():
        assert features[name].shape == (2, spec.channels, 96 // spec.stride, 64 // spec.stride)
    assert [s.stride for s in model.output_shape().values()] == [4, 8, 16, 32]
    assert [s.channels for s in model.output_shape().values()] == [32, 64, 128, 256]


def test_forward_with_embeddings_pools_res5():
    model = tiny_resnet()
    image = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        features, global_embedding, dense = model.forward_with_embeddings(image)
        expected_global, expected_dense = dense_attention_pool(model.attnpool, features["res5"])
    torch.testing.assert_close(features["res3"], model(image)["res3"])
    assert dense.shape == (2, 32, 3, 2) and global_embedding.shape == (2, 32)
    torch.testing.assert_close(dense, expected_dense)
    torch.testing.assert_close(global_embedding, expected_global)


def test_frozen_batchnorm_and_freeze_at():
    model = clip_resnet(norm="FrozenBN")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert not any(k.endswith("num_batches_tracked") for k in model.state_dict())

    model = clip_resnet(freeze_at=2)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("conv", "bn", "layer1.")) for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(("layer2", "layer4")))
    assert isinstance(model.bn1, FrozenBatchNorm2d) and isinstance(model.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(model.layer2[0].bn1, torch.nn.BatchNorm2d)


def test_without_attention_pool():
    model = clip_resnet(with_attention_pool=False)
    assert model.attnpool is None
    with pytest.raises(RuntimeError, match="without its attention pool"):
        model.forward_with_embeddings(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize(
    "layers, embed_dim, trunk_millions",
    [([3, 4, 6, 3], 1024, 23.5), ([3, 4, 23, 3], 512, 42.5)],
    ids=["RN50", "RN101"],
)
def test_full_size_shapes_and_parameter_counts(layers, embed_dim, trunk_millions):
    model = clip_resnet(layers=layers, width=64, embed_dim=embed_dim, input_resolution=1344)
    grid = model.attnpool.positional_embedding
    assert grid.shape == (42 * 42 + 1, 2048)
    trunk = count_parameters(model) - count_parameters(model.attnpool)
    pool_without_grid = count_parameters(model.attnpool) - grid.numel()
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
    model = clip_resnet(norm="SyncBN")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is torch.nn.SyncBatchNorm for m in norms)
    model = clip_resnet(norm="naiveSyncBN")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is NaiveSyncBatchNorm for m in norms)
    assert all(m.weight.requires_grad for m in norms)
