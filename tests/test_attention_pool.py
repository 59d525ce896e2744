import pytest
import torch

from denseclip.modeling.backbone import dense_attention_pool, resize_positional_grid

from helpers import any_backbone_cfg, bilinear_grid, direct_attention_pool, tiny_resnet


def test_dense_embedding_is_attention_at_every_location():
    model = tiny_resnet()  # 64 px -> 2 x 2 grid
    res5 = torch.randn(2, 256, 2, 2)
    with torch.no_grad():
        global_embedding, dense = dense_attention_pool(model.attnpool, res5)
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
        _, dense = dense_attention_pool(model.attnpool, res5)
        _, expected = direct_attention_pool(model.attnpool, res5, top_left)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "size, resized",
    [((5, 3), (5, 3)), ((3, 1), (3, 2)), ((1, 4), (2, 4))],
    ids=["both-sides-larger", "taller-narrower", "shorter-wider"],
)
def test_feature_map_larger_than_grid_interpolates(size, resized):
    """A side larger than the 2 x 2 grid: the grid is resized bilinearly to max(side, grid) on each
    axis, then its top-left part of the feature map's size is used (the release's rule where it fits)."""
    model = tiny_resnet()
    pool = model.attnpool
    res5 = torch.randn(1, 256, *size)
    grid = bilinear_grid(pool.positional_embedding.detach(), 2, *resized).reshape(*resized, -1)
    positions = torch.cat([pool.positional_embedding[:1], grid[: size[0], : size[1]].reshape(size[0] * size[1], -1)])
    with torch.no_grad():
        _, dense = dense_attention_pool(pool, res5)
        _, expected = direct_attention_pool(pool, res5, positions)
    assert dense.shape == (1, 32, *size)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-5)


def test_resize_positional_grid_is_bilinear_and_keeps_the_class_position():
    pool = torch.randn(1 + 3 * 3, 8)
    for size in ((3, 3), (7, 5), (2, 6)):
        resized = resize_positional_grid(pool, size)
        torch.testing.assert_close(resized[0], pool[0], rtol=0, atol=0)
        torch.testing.assert_close(resized[1:], bilinear_grid(pool, 3, *size))


def test_attention_pooled_backbone_pools_the_top_feature():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_resnet_backbone

    from denseclip.modeling.backbone import AttentionPooledBackbone

    cfg = any_backbone_cfg()
    net = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    torch.manual_seed(0)
    pooled = AttentionPooledBackbone(net, "res5", embed_dim=32, heads=4, grid_size=2)
    image = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        features, global_embedding, dense = pooled.forward_with_embeddings(image)
        expected_global, expected_dense = dense_attention_pool(pooled.attnpool, net(image)["res5"])
    assert pooled.output_shape() == net.output_shape()
    assert dense.shape == (2, 32, 3, 2) and global_embedding.shape == (2, 32)
    torch.testing.assert_close(dense, expected_dense)
    torch.testing.assert_close(global_embedding, expected_global)
    # Initialised as CLIP initialises its pool: projections with std in_channels^-0.5.
    assert pooled.attnpool.q_proj.weight.std().item() == pytest.approx(512**-0.5, rel=0.05)
