from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from .denseclip_detector import DenseCLIPDetectorMixin

__all__ = ["DenseCLIPRCNN"]


@META_ARCH_REGISTRY.register()
class DenseCLIPRCNN(DenseCLIPDetectorMixin, GeneralizedRCNN):
    """Detectron2's (Mask) R-CNN on a language-guided CLIP-FPN, plus the auxiliary score-map loss."""

    @property
    def num_classes(self) -> int:
        return self.roi_heads.num_classes
