import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec

from denseclip.modeling import build_retinanet_clip_fpn_backbone

from helpers import backbone_cfg, tiny_detector_cfg


@pytest.mark.parametrize("relu_before_p7", [False, True])
def test_retinanet_p6_p7(relu_before_p7):
    """P6 = conv(res5 with the score map); P7 = conv(P6) as the release's MMDetection FPN computes it
    (add_extra_convs "on_input", no ReLU between the extra convs), or conv(relu(P6)) as Detectron2's."""
    cfg = tiny_detector_cfg("retinanet")
    cfg.MODEL.FPN.RELU_BEFORE_P7 = relu_before_p7
    torch.manual_seed(0)
    backbone = build_retinanet_clip_fpn_backbone(backbone_cfg(cfg), ShapeSpec(channels=3)).eval()
    image = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        features, score_map, *_ = backbone.forward_with_score_map(image)
        res5 = torch.cat([backbone.bottom_up(image)["res5"], score_map], dim=1)
        top = backbone.neck.top_block
        p6 = F.conv2d(res5, top.p6.weight, top.p6.bias, stride=2, padding=1)
        p7 = F.conv2d(F.relu(p6) if relu_before_p7 else p6, top.p7.weight, top.p7.bias, stride=2, padding=1)
    assert res5.shape[1] == 256 + 3  # res5 and the 3 classes' score maps
    torch.testing.assert_close(features["p6"], p6)
    torch.testing.assert_close(features["p7"], p7)


@pytest.mark.slow
def test_any_backbone_trains_with_weights_from_two_files(tmp_path, caplog):
    """Detectron2's ResNet (weights from a Detectron2 pickle, as ImageNet weights come) with a new
    attention pool, the text encoder from a separate CLIP file: loading reports both files; a few
    iterations move the contexts and the pool, not the text encoder."""
    import pickle

    import numpy as np

    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_resnet_backbone

    from denseclip import register_coco_format_datasets
    from denseclip.engine import DenseCLIPTrainer
    from denseclip.modeling.backbone import AttentionPooledBackbone

    from helpers import any_backbone_cfg, dataset_opts, tiny_open_clip, write_coco_dataset

    clip = tiny_open_clip()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    cfg = any_backbone_cfg("mask_rcnn")
    torch.manual_seed(5)
    resnet = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    with open(tmp_path / "R-18.pkl", "wb") as f:  # Detectron2's format of ImageNet weights
        weights = {k: v.numpy() for k, v in resnet.state_dict().items()}
        pickle.dump({"model": weights, "__author__": "test", "matching_heuristics": True}, f)
    json_file, image_dir = write_coco_dataset(str(tmp_path / "data"), class_names=("cat", "dog", "traffic light"))
    cfg.merge_from_list(dataset_opts(json_file, image_dir))
    register_coco_format_datasets(cfg)
    cfg.MODEL.DENSECLIP.CLASS_NAMES = []
    cfg.MODEL.WEIGHTS, cfg.MODEL.DENSECLIP.TEXT_WEIGHTS = str(tmp_path / "R-18.pkl"), str(tmp_path / "clip.pt")
    cfg.MODEL.DENSECLIP.CONTEXT_DECODER.DROPOUT = 0.0
    cfg.OUTPUT_DIR, cfg.SOLVER.MAX_ITER, cfg.DATASETS.TEST = str(tmp_path / "out"), 4, ()
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH = 0, 1e-3, 2
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (96,), 96
    trainer = DenseCLIPTrainer(cfg)
    with caplog.at_level("INFO"):
        trainer.resume_or_load(resume=False)
    model = trainer.model
    assert isinstance(model.backbone.bottom_up, AttentionPooledBackbone)
    assert "R-18.pkl" in caplog.text and "Loaded the text encoder from CLIP weights" in caplog.text
    assert f"{tmp_path / 'clip.pt'} (MODEL.DENSECLIP.TEXT_WEIGHTS)" in caplog.text
    net = model.backbone.bottom_up.net
    assert torch.equal(net.res3[0].conv1.weight, resnet.res3[0].conv1.weight)  # from the pickle
    text = model.backbone.score_map.text_encoder
    assert torch.equal(text.token_embedding.weight, clip.token_embedding.weight)  # from the CLIP file
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 4 and np.isfinite(losses).all()
    after = dict(model.named_parameters())
    moved = lambda name: not torch.equal(after[name], before[name])  # noqa: E731
    assert moved("backbone.score_map.text_encoder.contexts")
    assert moved("backbone.bottom_up.attnpool.q_proj.weight")
    assert moved("backbone.bottom_up.net.res5.0.conv1.weight")
    text_parameters = [n for n in before if n.startswith("backbone.score_map.text_encoder.")]
    assert len(text_parameters) > 5
    assert [n for n in text_parameters if moved(n)] == ["backbone.score_map.text_encoder.contexts"]
