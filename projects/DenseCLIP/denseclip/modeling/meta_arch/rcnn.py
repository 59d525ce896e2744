from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.utils.events import get_event_storage

from .denseclip import DenseCLIPDetector

__all__ = ["DenseCLIPRCNN"]


@META_ARCH_REGISTRY.register()
class DenseCLIPRCNN(DenseCLIPDetector, GeneralizedRCNN):
    """Detectron2's (Mask) R-CNN on a language-guided backbone, plus the auxiliary score-map loss."""

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        guided = self.extract_features(images)
        features = guided.features
        if not self.training:
            proposals, _ = self.proposal_generator(images, features, None)
            results, _ = self.roi_heads(images, features, proposals, None)
            return self.postprocess(results, batched_inputs, images, guided)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
            self.visualize_training(batched_inputs, proposals)
        loss_score_map = self.score_map_loss(guided.score_map, gt_instances, images.tensor.shape[-2:])
        return {**detector_losses, **proposal_losses, "loss_score_map": loss_score_map}
