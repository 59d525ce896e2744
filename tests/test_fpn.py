import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec

from denseclip.modeling import build_retinanet_clip_fpn_backbone

from helpers import tiny_detector_cfg


@pytest.mark.parametrize("relu_before_p7", [False, True])
def test_retinanet_p6_p7(relu_before_p7):
    """P6 = conv(res5 with the score map); P7 = conv(P6) as the release's MMDetection FPN computes it
    (add_extra_convs "on_input", no ReLU between the extra convs), or conv(relu(P6)) as Detectron2's."""
    cfg = tiny_detector_cfg("retinanet")
    cfg.MODEL.FPN.RELU_BEFORE_P7 = relu_before_p7
    torch.manual_seed(0)
    backbone = build_retinanet_clip_fpn_backbone(cfg, ShapeSpec(channels=3)).eval()
    image = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        features, score_map = backbone.forward_with_score_map(image)
        res5 = torch.cat([backbone.bottom_up(image)["res5"], score_map], dim=1)
        top = backbone.neck.top_block
        p6 = F.conv2d(res5, top.p6.weight, top.p6.bias, stride=2, padding=1)
        p7 = F.conv2d(F.relu(p6) if relu_before_p7 else p6, top.p7.weight, top.p7.bias, stride=2, padding=1)
    assert res5.shape[1] == 256 + 3  # res5 and the 3 classes' score maps
    torch.testing.assert_close(features["p6"], p6)
    torch.testing.assert_close(features["p7"], p7)
