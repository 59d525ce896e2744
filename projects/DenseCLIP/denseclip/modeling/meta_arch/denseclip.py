"""What DenseCLIP adds to a Detectron2 meta-architecture: shared by its detectors and its semantic segmentor."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList, Instances

from ...data.class_names import parse_vocabulary
from ..backbone.language_guided import LanguageGuidedBackbone
from ..postprocessing import postprocess_instances
from ..score_map_loss import ScoreMapLoss
from ..text_encoder import tokenize_class_names

__all__ = ["DenseCLIPDetector", "DenseCLIPModel"]


class DenseCLIPModel:
    """
    Mixed in before a Detectron2 meta-architecture whose backbone is a :class:`LanguageGuidedBackbone`.
    Provides :meth:`extract_features` (features and score map), the inference vocabulary, and
    :meth:`score_maps_on_image`.

    With ``return_score_maps`` (MODEL.DENSECLIP.RETURN_SCORE_MAPS) inference also returns, per image,
    ``"score_maps"``: K x H x W score-map logits (cosine / tau) on the original image. Their K names
    are ``score_map_names``: the model's classes, or the ``vocabulary`` set for inference (any names;
    the head keeps its own classes).
    """

    #: The config key of the head's class count, for error messages.
    num_classes_key: str = ""

    @configurable
    def __init__(self, *, return_score_maps: bool, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(self.backbone, LanguageGuidedBackbone):
            raise ValueError(
                f"MODEL.META_ARCHITECTURE {type(self).__name__} reads pixel-text score maps, but "
                f"MODEL.BACKBONE.NAME builds a {type(self.backbone).__name__} without them. Use a backbone "
                f"of this project (build_clip_fpn_backbone, build_retinanet_clip_fpn_backbone, ...), or "
                f"a stock meta-architecture (GeneralizedRCNN, RetinaNet, SlidingWindowSemanticSegmentor) "
                f"for a model without language guidance."
            )
        class_names = self.backbone.class_names
        if len(class_names) != self.num_classes:
            raise ValueError(
                f"The text prompts have {len(class_names)} classes ({', '.join(class_names[:5])}"
                f"{', ...' if len(class_names) > 5 else ''}) but the head has {self.num_classes} "
                f"({self.num_classes_key}). Set {self.num_classes_key} {len(class_names)} to match the "
                f"dataset, or fix MODEL.DENSECLIP.CLASS_NAMES."
            )
        self.return_score_maps = return_score_maps
        self._vocabulary: Optional[List[str]] = None

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["return_score_maps"] = cfg.MODEL.DENSECLIP.RETURN_SCORE_MAPS
        return ret

    @property
    def vocabulary(self) -> Optional[List[str]]:
        """Names whose score maps inference returns; None for the model's own classes."""
        return self._vocabulary

    @vocabulary.setter
    def vocabulary(self, names: Optional[Union[str, Sequence[str]]]):
        """A list of names, or one string of comma-separated names (see :func:`parse_vocabulary`)."""
        if names is not None:
            names = parse_vocabulary(names)
            text_encoder = self.backbone.score_map.text_encoder
            tokenize_class_names(names, text_encoder.prompt_length)  # a clear error now, not at inference
        self._vocabulary = names

    @property
    def score_map_names(self) -> List[str]:
        return list(self._vocabulary or self.backbone.class_names)

    def extract_features(self, images: ImageList) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """The backbone's features and its B x K x h x w score map (the vocabulary's, in inference)."""
        vocabulary = None if self.training else self._vocabulary
        return self.backbone.forward_with_score_map(images.tensor, vocabulary)

    @staticmethod
    def score_maps_on_image(
        score_map: torch.Tensor, padded_size: Tuple[int, int], image_size: Tuple[int, int], height: int, width: int
    ) -> torch.Tensor:
        """One image's K x h x w score map upsampled to the padded input, then cropped to ``image_size``
        and resized to ``height`` x ``width`` like semantic outputs: K x height x width."""
        logits = F.interpolate(score_map[None], size=padded_size, mode="bilinear", align_corners=False)[0]
        return sem_seg_postprocess(logits, image_size, height, width)


class DenseCLIPDetector(DenseCLIPModel):
    """
    Mixed in before a Detectron2 detector (RetinaNet, GeneralizedRCNN) whose backbone is a
    :class:`LanguageGuidedBackbone`. Adds :meth:`score_map_losses` (the box-target auxiliary loss) and
    :meth:`postprocess` (instances, and score maps on the image when asked).

    Inference returns, per image, ``{"instances": Instances}``, plus ``"score_maps"`` when
    ``return_score_maps`` is set (see :class:`DenseCLIPModel`).
    """

    @configurable
    def __init__(self, *, score_map_loss: ScoreMapLoss, **kwargs):
        super().__init__(**kwargs)
        self.score_map_loss = score_map_loss

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["score_map_loss"] = ScoreMapLoss(cfg)
        return ret

    def score_map_losses(
        self, score_map: torch.Tensor, gt_instances: List[Instances], images: ImageList
    ) -> Dict[str, torch.Tensor]:
        return {"loss_score_map": self.score_map_loss(score_map, gt_instances, images.tensor.shape[-2:])}

    def postprocess(
        self, instances: List[Instances], batched_inputs: List[dict], images: ImageList, score_map: torch.Tensor
    ) -> List[dict]:
        """Per image: instances rescaled to the input's height and width, and the score maps there too
        when ``return_score_maps`` (upsampled to the padded input, then resized like semantic outputs)."""
        results = []
        for index, (inst, inputs, image_size) in enumerate(zip(instances, batched_inputs, images.image_sizes)):
            height, width = inputs.get("height", image_size[0]), inputs.get("width", image_size[1])
            result = {"instances": postprocess_instances(inst, height, width)}
            if self.return_score_maps:
                result["score_maps"] = self.score_maps_on_image(
                    score_map[index], images.tensor.shape[-2:], image_size, height, width
                )
            results.append(result)
        return results
