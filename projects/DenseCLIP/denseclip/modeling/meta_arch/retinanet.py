from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet

from .denseclip_detector import DenseCLIPDetectorMixin

__all__ = ["DenseCLIPRetinaNet"]


@META_ARCH_REGISTRY.register()
class DenseCLIPRetinaNet(DenseCLIPDetectorMixin, RetinaNet):
    """Detectron2's RetinaNet on a language-guided CLIP-FPN, plus the auxiliary score-map loss."""
