import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from detectron2.layers import ShapeSpec

from denseclip.checkpoint import DenseCLIPCheckpointer
from denseclip.modeling import build_clip_fpn_backbone

from helpers import backbone_cfg, build_open_clip, tiny_cfg, tiny_open_clip


def rn50_backbone(input_resolution=224, denseclip=True):
    cfg = tiny_cfg(denseclip=denseclip, class_names=["person", "dog"])
    cfg.MODEL.CLIP.LAYERS = [3, 4, 6, 3]
    cfg.MODEL.CLIP.WIDTH = 64
    cfg.MODEL.CLIP.EMBED_DIM = 1024
    cfg.MODEL.CLIP.INPUT_RESOLUTION = input_resolution
    cfg.MODEL.CLIP.TEXT.WIDTH, cfg.MODEL.CLIP.TEXT.HEADS, cfg.MODEL.CLIP.TEXT.LAYERS = 512, 8, 12
    torch.manual_seed(0)  # the parts CLIP does not provide start the same in every build
    return build_clip_fpn_backbone(backbone_cfg(cfg), ShapeSpec(channels=3)).eval()


def tiny_backbone(cfg=None):
    return build_clip_fpn_backbone(backbone_cfg(cfg or tiny_cfg()), ShapeSpec(channels=3)).eval()


@pytest.fixture(scope="module")
def loaded_rn50(rn50_checkpoints):
    backbones = {}
    for kind, path in rn50_checkpoints.items():
        backbones[kind] = rn50_backbone()
        DenseCLIPCheckpointer(backbones[kind]).load(path)
    return backbones


def test_torchscript_and_state_dict_give_identical_parameters(loaded_rn50):
    a, b = (loaded_rn50[k].state_dict() for k in ("torchscript", "state_dict"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_global_embedding_matches_open_clip_encode_image(open_clip_rn50, loaded_rn50):
    image = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = open_clip_rn50.encode_image(image)
        encoder = loaded_rn50["torchscript"].bottom_up
        _, global_embedding, dense = encoder.forward_with_embeddings(image)
    assert dense.shape == (2, 1024, 7, 7)
    scale = expected.abs().max().item()
    assert (global_embedding - expected).abs().max().item() <= 1e-4 * scale


def test_text_encoder_loaded(open_clip_rn50, loaded_rn50):
    text = loaded_rn50["state_dict"].score_map.text_encoder
    assert torch.equal(text.token_embedding.weight, open_clip_rn50.token_embedding.weight)
    assert torch.equal(text.positional_embedding, open_clip_rn50.positional_embedding[:13])


def test_positional_grid_interpolated_to_configured_resolution(open_clip_rn50, rn50_checkpoints, caplog):
    backbone = rn50_backbone(input_resolution=1344)
    with caplog.at_level("INFO"):
        DenseCLIPCheckpointer(backbone).load(rn50_checkpoints["state_dict"])
    grid = backbone.bottom_up.attnpool.positional_embedding.detach()
    assert grid.shape == (42 * 42 + 1, 2048)
    # The release's rule at load time: CLIP's 7 x 7 grid resized with F.interpolate (bilinear), class row kept.
    clip_grid = open_clip_rn50.visual.attnpool.positional_embedding.detach()
    expected = F.interpolate(clip_grid[1:].reshape(1, 7, 7, 2048).permute(0, 3, 1, 2), size=(42, 42), mode="bilinear")
    torch.testing.assert_close(grid[0], clip_grid[0], rtol=0, atol=0)
    torch.testing.assert_close(grid[1:], expected[0].permute(1, 2, 0).reshape(42 * 42, 2048))
    assert "interpolated 7x7 -> 42x42" in caplog.text
    assert "keep their fresh initialisation, as intended" in caplog.text


def test_safetensors_and_fp16_state_dicts(tmp_path):
    clip = tiny_open_clip()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    torch.save({k: v.half() for k, v in clip.state_dict().items()}, tmp_path / "tiny_fp16.pt")
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in clip.state_dict().items()}},
               tmp_path / "open_clip_training.pt")
    loaded = {}
    for name in ("tiny.safetensors", "tiny_fp16.pt", "open_clip_training.pt"):
        backbone = tiny_backbone()
        DenseCLIPCheckpointer(backbone).load(str(tmp_path / name))
        loaded[name] = backbone.state_dict()
        assert all(v.dtype != torch.float16 for v in loaded[name].values())
    conv = "bottom_up.layer1.0.conv1.weight"
    assert torch.equal(loaded["tiny.safetensors"][conv], clip.visual.layer1[0].conv1.weight)
    assert torch.equal(loaded["open_clip_training.pt"][conv], clip.visual.layer1[0].conv1.weight)
    torch.testing.assert_close(loaded["tiny_fp16.pt"][conv], clip.visual.layer1[0].conv1.weight, atol=1e-3, rtol=1e-3)


def test_clip_baseline_loads_image_encoder_only(tmp_path, caplog):
    torch.save(tiny_open_clip().state_dict(), tmp_path / "tiny.pt")
    backbone = tiny_backbone(tiny_cfg(denseclip=False))
    with caplog.at_level("INFO"):
        DenseCLIPCheckpointer(backbone).load(str(tmp_path / "tiny.pt"))
    assert "0 text-encoder tensors" in caplog.text
    assert "the CLIP baseline has no attention pool" in caplog.text


def test_missing_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "RN50.pt"
    with pytest.raises(FileNotFoundError) as error:
        DenseCLIPCheckpointer(tiny_backbone()).load(str(missing))
    assert str(missing) in str(error.value) and "MODEL.WEIGHTS" in str(error.value)


def test_other_architecture_is_a_clear_error(tmp_path):
    torch.save(tiny_open_clip(layers=[1, 1, 2, 1]).state_dict(), tmp_path / "deeper.pt")
    backbone = tiny_backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(ValueError) as error:
        DenseCLIPCheckpointer(backbone).load(str(tmp_path / "deeper.pt"))
    message = str(error.value)
    assert "deeper.pt" in message and "LAYERS [1, 1, 2, 1]" in message and "LAYERS [1, 1, 1, 1]" in message
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())  # nothing half-loaded


def test_rn101_weights_into_rn50_config(tmp_path):
    torch.save(build_open_clip("RN101-quickgelu").state_dict(), tmp_path / "RN101.pt")
    with pytest.raises(ValueError, match=r"CLIP RN101.*EMBED_DIM 1024"):
        DenseCLIPCheckpointer(rn50_backbone()).load(str(tmp_path / "RN101.pt"))
