"""
Semantic segmentation against the release's rules (MMSegmentation 0.19, the release's segmentation code),
written down here:

- Sliding windows: per axis max(ceil((size - crop) / stride), 0) + 1 windows starting at multiples of the
  stride; a window ending past the border is moved back to end at it; a crop larger than the image is cut
  to the image. The logits of overlapping windows are summed and divided by how many windows cover each
  pixel.
- Losses: cross-entropy with label 255 ignored, summed over the valid pixels and divided by ALL pixels of
  the label map (ignored ones count 0). Auxiliary loss: (cosine score map / tau) resized bilinearly
  (align_corners False) to the label map's size, the same cross-entropy, weight 0.4.
- The score map is concatenated to res5 as the plain cosine similarity (no tau).
- The attention pool's positional grid is resized bilinearly to the feature map (whole grid).
- ViT-B pyramid: patch tokens after blocks 3, 5, 7, 11 (here the tiny ViT's 0-3) -> GroupNorm(1) ->
  2 transposed convs (stride 4) / 1 (stride 8) / none (stride 16) / max pool 2 (stride 32).
"""
import pytest
import torch
import torch.nn.functional as F

from detectron2.modeling import build_model
from detectron2.structures import ImageList

from denseclip.modeling.meta_arch import sliding_windows

from helpers import tiny_sem_seg_cfg

K = 3


def label_maps(batch=2, size=64, seed=0):
    """Label maps with classes 0..K-1 in blocks and an ignored (255) band."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (batch, size // 16, size // 16), generator=generator)
    labels = labels.repeat_interleave(16, 1).repeat_interleave(16, 2)
    labels[:, :, : size // 4] = 255
    return labels


def batch_of(labels):
    generator = torch.Generator().manual_seed(1)
    return [{"image": torch.rand(3, *x.shape, generator=generator) * 255, "sem_seg": x} for x in labels]


def no_dropout(cfg):
    cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.0
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.DROPOUT = 0.0
    return cfg


def all_pixel_mean_cross_entropy(logits, labels):
    """The release's rule, computed pixel by pixel: -log softmax at the label, 0 where ignored, / all pixels."""
    log_probabilities = logits.log_softmax(dim=1)
    total = 0.0
    for b, y, x in torch.nonzero(labels != 255).tolist():
        total -= log_probabilities[b, labels[b, y, x], y, x].item()
    return total / labels.numel()


# ------------------------------------------------------------------------------------------------
# Sliding windows
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "height, width, expected_rows, expected_cols",
    [
        # ADE20K-like 512 x 683: one row, two columns, the second moved back to end at 683.
        (512, 683, [(0, 512)], [(0, 512), (171, 683)]),
        # 1000 px: ceil(488 / 341) + 1 = 3 windows, the last one 488..1000.
        (1000, 853, [(0, 512), (341, 853), (488, 1000)], [(0, 512), (341, 853)]),
        # Smaller than the crop: one window, the whole side.
        (300, 512, [(0, 300)], [(0, 512)]),
    ],
)
def test_sliding_windows_follow_the_release_rule(height, width, expected_rows, expected_cols):
    expected = [(y1, y2, x1, x2) for y1, y2 in expected_rows for x1, x2 in expected_cols]
    assert sliding_windows(height, width, (512, 512), (341, 341)) == expected


def test_slide_equals_whole_when_one_window_covers_the_image():
    cfg = tiny_sem_seg_cfg()
    cfg.MODEL.DENSECLIP.RETURN_SCORE_MAPS = True
    model = build_model(cfg).eval()
    inputs = [{"image": torch.rand(3, 64, 64) * 255, "height": 48, "width": 80}]
    with torch.no_grad():
        model.test_mode = "slide"
        slide = model(inputs)[0]
        model.test_mode = "whole"
        whole = model(inputs)[0]
    assert slide["sem_seg"].shape == whole["sem_seg"].shape == (K, 48, 80)
    assert torch.allclose(slide["sem_seg"], whole["sem_seg"], atol=1e-5)
    assert torch.allclose(slide["score_maps"], whole["score_maps"], atol=1e-5)


def test_slide_averages_overlapping_windows():
    """Windows whose 'logits' are known: pixel value + 1000 x the window's first row + its first column.
    Every pixel must get its value plus the mean of that offset over the windows covering it."""
    model = build_model(tiny_sem_seg_cfg(denseclip=False)).eval()
    model.test_mode, model.crop_size, model.stride = "slide", (4, 5), (3, 2)
    height, width = 9, 11
    image = torch.arange(height * width, dtype=torch.float32).reshape(1, height, width).expand(3, -1, -1)
    coordinates = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).float()

    def known_logits(crop, inputs):
        # The crop holds y * 11 + x values; the window's origin is the top-left value.
        origin = crop[0, 0, 0]
        y1, x1 = origin // width, origin % width
        return {"sem_seg": crop[:1] + 1000 * y1 + x1}

    model.predict_window = known_logits
    out = model.segment(image, {})["sem_seg"][0]

    # The windows of the rule, listed by hand for 9 x 11, crop 4 x 5, stride 3 x 2:
    # rows ceil(5 / 3) + 1 = 3: 0-4, 3-7, 5-9 (6-10 moved back); cols ceil(6 / 2) + 1 = 4: 0-5, 2-7, 4-9, 6-11.
    rows, cols = [(0, 4), (3, 7), (5, 9)], [(0, 5), (2, 7), (4, 9), (6, 11)]
    for y in range(height):
        for x in range(width):
            offsets = [1000 * y1 + x1 for y1, y2 in rows for x1, x2 in cols if y1 <= y < y2 and x1 <= x < x2]
            expected = y * width + x + sum(offsets) / len(offsets)
            assert out[y, x].item() == pytest.approx(expected), (y, x)
    assert coordinates.shape[1:] == out.shape


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
def test_auxiliary_loss_resizes_the_score_map_and_averages_over_all_pixels():
    cfg = no_dropout(tiny_sem_seg_cfg())
    model = build_model(cfg)
    labels = label_maps()
    batch = batch_of(labels)
    torch.manual_seed(0)
    losses = model(batch)

    # The score map the backbone gives for the same (deterministic) batch.
    images = ImageList.from_tensors([(x["image"] - model.pixel_mean) / model.pixel_std for x in batch], 32)
    _, score_map, *_ = model.backbone.forward_with_score_map(images.tensor)
    assert score_map.shape == (2, K, 2, 2)  # stride 32
    logits = F.interpolate(score_map, size=(64, 64), mode="bilinear", align_corners=False)
    expected = 0.4 * all_pixel_mean_cross_entropy(logits, labels)
    assert losses["loss_score_map"].item() == pytest.approx(expected, rel=1e-4)
    # Averaging over the valid pixels only (3/4 of them) would give 4/3 of it.
    valid_mean = 0.4 * F.cross_entropy(logits, labels, ignore_index=255).item()
    assert valid_mean == pytest.approx(expected * 4 / 3, rel=1e-4)


def test_head_loss_averages_over_all_pixels():
    cfg = no_dropout(tiny_sem_seg_cfg(denseclip=False))
    model = build_model(cfg)
    labels = label_maps()
    batch = batch_of(labels)
    losses = model(batch)
    images = ImageList.from_tensors([(x["image"] - model.pixel_mean) / model.pixel_std for x in batch], 32)
    head = model.sem_seg_head
    logits = head.layers(model.backbone(images.tensor))  # stride 4
    logits = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    assert losses["loss_sem_seg"].item() == pytest.approx(all_pixel_mean_cross_entropy(logits, labels), rel=1e-4)


def test_classifier_starts_from_pytorch_default_init_as_the_release():
    """The release never calls its decode head's init_weights, so conv_seg keeps nn.Conv2d's default:
    weight and bias uniform in +-1/sqrt(fan_in). Detectron2's MSRA fill (normal, std sqrt(2 / classes))
    would give 3 classes on 256 channels a std of 0.82 (150 classes 0.115), far outside that bound."""
    cfg = tiny_sem_seg_cfg()
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 256
    torch.manual_seed(0)
    predictor = build_model(cfg).sem_seg_head.predictor
    bound = 1 / 256 ** 0.5
    assert predictor.weight.abs().max() <= bound and predictor.bias.abs().max() <= bound
    assert abs(float(predictor.weight.std()) - bound / 3 ** 0.5) < 0.003  # uniform's std, not a narrower init
    assert float(predictor.bias.abs().max()) > bound / 2  # the bias too, not zeros


def test_score_map_joins_res5_as_cosine_similarity():
    cfg = no_dropout(tiny_sem_seg_cfg())
    model = build_model(cfg).eval()
    seen = {}
    model.backbone.neck.register_forward_pre_hook(lambda module, inputs: seen.update(inputs[0]))
    with torch.no_grad():
        _, score_map, *_ = model.backbone.forward_with_score_map(torch.randn(1, 3, 64, 96))
    res5 = seen["res5"]
    assert res5.shape[1] == 8 * 32 + K
    assert torch.allclose(res5[:, -K:], score_map * 0.07, atol=1e-6)
    assert res5[:, -K:].abs().max() <= 1.0 + 1e-6


def test_attention_pool_grid_resized_to_the_feature_map():
    from denseclip.modeling.backbone.attention_pool import dense_attention_pool

    cfg = tiny_sem_seg_cfg()
    model = build_model(cfg).eval()
    resnet = model.backbone.bottom_up
    assert resnet.attention_pool_grid == "resize"
    res5 = torch.randn(1, 256, 4, 4)
    pool = resnet.attnpool
    with torch.no_grad():
        _, dense = resnet.forward_with_embeddings(torch.randn(1, 3, 96, 160))[1:]
        # Independently: the 2 x 2 grid interpolated to 4 x 4 by torch, then used at its exact size.
        grid = pool.positional_embedding[1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False)
        expected_positions = torch.cat([pool.positional_embedding[:1], grid.flatten(2)[0].T])
        original = pool.positional_embedding.data.clone()
        _, resized = dense_attention_pool(pool, res5, "resize")
        pool.positional_embedding.data = expected_positions
        _, exact = dense_attention_pool(pool, res5, "crop")
        pool.positional_embedding.data = original
    assert dense.shape == (1, 32, 3, 5)
    assert torch.allclose(resized, exact, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# ViT-B pyramid
# ------------------------------------------------------------------------------------------------
def test_vit_pyramid_shapes_strides_and_levels():
    cfg = tiny_sem_seg_cfg(vit=True)
    model = build_model(cfg).eval()
    pyramid = model.backbone.bottom_up
    width = cfg.MODEL.CLIP.VIT.WIDTH
    assert {k: (v.channels, v.stride) for k, v in pyramid.output_shape().items()} == {
        "s4": (width, 4), "s8": (width, 8), "s16": (width, 16), "s32": (width, 32)
    }
    image = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = pyramid(image)
        # The blocks' patch tokens, computed here by running the transformer's blocks one by one.
        vit = pyramid.vit
        x = vit.conv1(image).flatten(2).transpose(1, 2)
        x = torch.cat([vit.class_embedding.expand(2, 1, -1), x], dim=1)
        grid = vit.positional_embedding[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(4, 6), mode="bilinear", align_corners=False).flatten(2)[0].T
        # The class token gets class_embedding twice: as the token and in its positional embedding.
        positions = torch.cat([vit.positional_embedding[:1] + vit.class_embedding, grid])
        x = vit.ln_pre(x + positions)
        maps = []
        for block in vit.transformer.resblocks:
            x = block(x)
            maps.append(x[:, 1:].transpose(1, 2).reshape(2, width, 4, 6))
    assert features["s4"].shape == (2, width, 16, 24) and features["s8"].shape == (2, width, 8, 12)
    assert features["s16"].shape == (2, width, 4, 6) and features["s32"].shape == (2, width, 2, 3)
    norm = pyramid.fpn3
    assert torch.allclose(features["s16"], F.group_norm(maps[2], 1, norm.weight, norm.bias), atol=1e-5)
    norm = pyramid.fpn4[0]
    expected_s32 = F.max_pool2d(F.group_norm(maps[3], 1, norm.weight, norm.bias), 2)
    assert torch.allclose(features["s32"], expected_s32, atol=1e-5)
    up = pyramid.fpn2[1]
    expected_s8 = F.conv_transpose2d(F.group_norm(maps[1], 1, pyramid.fpn2[0].weight, pyramid.fpn2[0].bias),
                                     up.weight, up.bias, stride=2)
    assert torch.allclose(features["s8"], expected_s8, atol=1e-5)


def test_vit_score_map_joins_the_stride_16_level():
    cfg = no_dropout(tiny_sem_seg_cfg(vit=True))
    model = build_model(cfg).eval()
    seen = {}
    model.backbone.neck.register_forward_pre_hook(lambda module, inputs: seen.update(inputs[0]))
    with torch.no_grad():
        _, score_map, *_ = model.backbone.forward_with_score_map(torch.randn(1, 3, 64, 96))
    width = cfg.MODEL.CLIP.VIT.WIDTH
    assert {k: v.shape[1] for k, v in seen.items()} == {"s4": width, "s8": width, "s16": width + K, "s32": width}
    assert score_map.shape == (1, K, 4, 6)
    assert torch.allclose(seen["s16"][:, -K:], score_map * 0.07, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Training and inference
# ------------------------------------------------------------------------------------------------
def test_two_image_training_improves_the_loss():
    from denseclip.solver import build_optimizer

    cfg = no_dropout(tiny_sem_seg_cfg())
    cfg.SOLVER.BASE_LR, cfg.SOLVER.BACKBONE_MULTIPLIER = 1e-3, 1.0
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    labels = label_maps()
    labels[0, 32:] = 1  # some structure to learn
    batch = batch_of(labels)
    totals = []
    for _ in range(8):
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert set(losses) == {"loss_sem_seg", "loss_score_map"}
    assert sum(totals[-3:]) / 3 < 0.5 * totals[0], totals


def test_inference_returns_sem_seg_and_score_maps_on_the_original_image():
    cfg = tiny_sem_seg_cfg()
    model = build_model(cfg).eval()
    with torch.no_grad():
        plain = model([{"image": torch.rand(3, 64, 96) * 255, "height": 100, "width": 150}])[0]
        both = model([{"image": torch.rand(3, 64, 96) * 255, "height": 100, "width": 150, "vocabulary": "cat, bird"}])[0]
    assert set(plain) == {"sem_seg"} and plain["sem_seg"].shape == (K, 100, 150)
    assert both["sem_seg"].shape == (K, 100, 150) and both["score_maps"].shape == (2, 100, 150)


def test_wrong_concat_feature_and_loss_rule_are_clear_errors():
    cfg = tiny_sem_seg_cfg()
    cfg.MODEL.DENSECLIP.SCORE_CONCAT_FEATURE = "s16"
    with pytest.raises(ValueError, match="SCORE_CONCAT_FEATURE 's16'.*res2, res3, res4, res5"):
        build_model(cfg)
    cfg = tiny_sem_seg_cfg()
    cfg.MODEL.SEM_SEG_HEAD.LOSS_NORMALIZATION = "pixels"
    with pytest.raises(ValueError, match="LOSS_NORMALIZATION must be one of"):
        build_model(cfg)
    cfg = tiny_sem_seg_cfg()
    cfg.MODEL.DENSECLIP.SCORE_MAP_LOSS.TARGET = "box"  # a detector's rule on a segmentor
    with pytest.raises(ValueError, match=r"TARGET 'box' does not fit .*DenseCLIPSemanticSegmentor.*\('label_map',\)"):
        build_model(cfg)
    cfg = tiny_sem_seg_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.NUM_CLASSES 3"):
        build_model(cfg)


# ------------------------------------------------------------------------------------------------
# Multi-scale + flip test
# ------------------------------------------------------------------------------------------------
def test_multi_scale_flip_test_averages_probabilities_on_the_original_image():
    """The release: for each scale ratio r, resize to r x (512 shorter side, 2048 longest), run, resize
    the logits to the original image, softmax; with flip also the mirrored image, its probabilities
    mirrored back; the probabilities averaged."""
    from denseclip.modeling.test_time_augmentation import SemanticSegmentorWithTTA

    cfg = tiny_sem_seg_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 512, 2048
    cfg.TEST.AUG.SCALE_RATIOS, cfg.TEST.AUG.FLIP = [0.5, 1.0], True
    seen = []

    class KnownModel(torch.nn.Module):
        """Class 0's logit: the image's first channel (a ramp), resized to the original size; class 1: 0."""

        def forward(self, inputs):
            (x,) = inputs
            seen.append(tuple(x["image"].shape[-2:]))
            ramp = F.interpolate(x["image"][None, :1].float(), size=(x["height"], x["width"]), mode="bilinear")[0]
            return [{"sem_seg": torch.cat([ramp, torch.zeros_like(ramp)])}]

    height, width = 100, 500
    ramp = torch.linspace(0, 6, width).expand(3, height, width)
    outputs = SemanticSegmentorWithTTA(cfg, KnownModel())([{"image": ramp, "height": height, "width": width}])
    # Scales r = 0.5, 1: the largest size with shorter side <= r x 512 and longest <= r x 2048 (the
    # latter binds here): 100 x 500 x min(1024 / 500, 256 / 100) = 205 x 1024, and 410 x 2048.
    assert seen == [(205, 1024), (205, 1024), (410, 2048), (410, 2048)]
    probabilities = outputs[0]["sem_seg"]
    assert probabilities.shape == (2, height, width)
    # Mirrored back, every run gives about the unmirrored ramp: class 0's probability rises left to right.
    expected = torch.sigmoid(torch.linspace(0, 6, width))
    assert torch.allclose(probabilities[0, 50], expected, atol=0.02)
    assert torch.allclose(probabilities.sum(0), torch.ones(height, width), atol=1e-5)


def test_vit_pyramid_model_loads_clip_weights_with_the_grid_resized(tmp_path):
    """CLIP's ViT weights go to the pyramid's transformer (the pyramid levels are new), the 4 x 4
    positional grid interpolated bilinearly to the config's 8 x 8 (INPUT_RESOLUTION 128) at load."""
    from denseclip.checkpoint import DenseCLIPCheckpointer
    from helpers import tiny_open_clip_vit

    clip = tiny_open_clip_vit(layers=4)
    path = tmp_path / "tiny_vit.pt"
    torch.save(clip.state_dict(), path)
    cfg = tiny_sem_seg_cfg(vit=True)
    cfg.MODEL.CLIP.INPUT_RESOLUTION = 128
    model = build_model(cfg).eval()
    DenseCLIPCheckpointer(model).load(str(path))
    vit = model.backbone.bottom_up.vit
    torch.testing.assert_close(vit.conv1.weight, clip.visual.conv1.weight)
    torch.testing.assert_close(vit.transformer.resblocks[3].mlp.c_fc.weight, clip.visual.transformer.resblocks[3].mlp.c_fc.weight)
    grid = clip.visual.positional_embedding[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False).flatten(2)[0].T
    torch.testing.assert_close(vit.positional_embedding, torch.cat([clip.visual.positional_embedding[:1], grid]))
    text = model.backbone.score_map.text_encoder
    torch.testing.assert_close(text.token_embedding.weight, clip.token_embedding.weight)
    with torch.no_grad():
        assert model([{"image": torch.rand(3, 64, 96) * 255}])[0]["sem_seg"].shape == (K, 64, 96)


def test_trainer_evaluates_miou_and_multi_scale_flip(tmp_path):
    """DenseCLIPTrainer.test gives SemSegEvaluator's mIoU; test_with_TTA at the single scale 1.0 without
    flip gives the softmax of the plain test's logits (same mIoU), and runs with scales and flips."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from denseclip import register_datasets_from_config
    from denseclip.engine import DenseCLIPTrainer
    from denseclip.modeling.test_time_augmentation import SemanticSegmentorWithTTA
    from test_sem_seg_folders import write_folders

    images, labels = write_folders(tmp_path / "val", ["a", "b"])
    cfg = tiny_sem_seg_cfg()
    cfg.DATASETS.SEM_SEG_FOLDERS.TEST_IMAGES, cfg.DATASETS.SEM_SEG_FOLDERS.TEST_LABELS = images, labels
    cfg.DATASETS.SEM_SEG_FOLDERS.CLASS_NAMES = list(cfg.MODEL.DENSECLIP.CLASS_NAMES)
    cfg.DATASETS.TRAIN, cfg.OUTPUT_DIR = (), str(tmp_path / "output")
    try:
        register_datasets_from_config(cfg)
        model = DenseCLIPTrainer.build_model(cfg)
        plain = DenseCLIPTrainer.test(cfg, model)
        cfg.TEST.AUG.SCALE_RATIOS, cfg.TEST.AUG.FLIP = [1.0], False
        single = DenseCLIPTrainer.test_with_TTA(cfg, model)
        (inputs,) = next(iter(DenseCLIPTrainer.build_test_loader(cfg, "sem_seg_folders_test")))
        with torch.no_grad():
            logits = model.eval()([inputs])[0]["sem_seg"]
            probabilities = SemanticSegmentorWithTTA(cfg, model)([inputs])[0]["sem_seg"]
        cfg.TEST.AUG.SCALE_RATIOS, cfg.TEST.AUG.FLIP = [0.5, 1.0], True
        multi = DenseCLIPTrainer.test_with_TTA(cfg, model)
    finally:
        DatasetCatalog.remove("sem_seg_folders_test")
        MetadataCatalog.remove("sem_seg_folders_test")
    assert 0 <= plain["sem_seg"]["mIoU"] <= 100
    assert single["sem_seg_TTA"]["mIoU"] == pytest.approx(plain["sem_seg"]["mIoU"])
    assert logits.shape == (K, 16, 24)
    assert torch.allclose(probabilities, logits.softmax(dim=0), atol=1e-5)
    assert 0 <= multi["sem_seg_TTA"]["mIoU"] <= 100
