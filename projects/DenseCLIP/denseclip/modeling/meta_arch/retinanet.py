from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet

from .denseclip import DenseCLIPDetector

__all__ = ["DenseCLIPRetinaNet"]


@META_ARCH_REGISTRY.register()
class DenseCLIPRetinaNet(DenseCLIPDetector, RetinaNet):
    """Detectron2's RetinaNet on a language-guided backbone, plus the auxiliary score-map loss."""

    @configurable
    def __init__(self, *, clip_boxes_before_nms: bool, **kwargs):
        super().__init__(**kwargs)
        self.clip_boxes_before_nms = clip_boxes_before_nms

    @classmethod
    def from_config(cls, cfg):
        return {**super().from_config(cfg), "clip_boxes_before_nms": cfg.MODEL.RETINANET.CLIP_BOXES_BEFORE_NMS}

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        guided = self.extract_features(images)
        features = [guided.features[f] for f in self.head_in_features]
        predictions = self.head(features)
        if not self.training:
            results = self.forward_inference(images, features, predictions)
            return self.postprocess(results, batched_inputs, images, guided)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        losses = self.forward_training(images, features, predictions, gt_instances)
        losses["loss_score_map"] = self.score_map_loss(guided.score_map, gt_instances, images.tensor.shape[-2:])
        return losses

    def _decode_per_level_predictions(self, anchors, pred_scores, pred_deltas, score_thresh, topk_candidates, image_size):
        instances = super()._decode_per_level_predictions(
            anchors, pred_scores, pred_deltas, score_thresh, topk_candidates, image_size
        )
        if self.clip_boxes_before_nms:  # NMS then sees the boxes it would keep
            instances.pred_boxes.clip(image_size)
        return instances
