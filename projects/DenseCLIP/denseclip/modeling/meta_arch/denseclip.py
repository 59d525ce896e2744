"""What DenseCLIP adds to a Detectron2 meta-architecture: shared by its detectors and its semantic segmentor."""
from typing import Dict, List, Optional, Tuple

import torch

from detectron2.config import configurable
from detectron2.structures import ImageList, Instances

from ...data.class_names import resolve_class_names
from ..backbone.language_guided import LanguageGuidedBackbone, LanguageGuidedFeatures
from ..postprocessing import postprocess_instances, score_maps_on_image
from ..score_map import PixelTextScoreMap
from ..score_map_loss import ScoreMapLoss
from ..task import head_num_classes, task_of

__all__ = ["DenseCLIPDetector", "DenseCLIPModel", "language_guided_cfg"]


def language_guided_cfg(cfg, metadata_classes: str):
    """``cfg`` as a DenseCLIP meta-architecture builds its backbone with: MODEL.DENSECLIP.LANGUAGE_GUIDED
    set, and MODEL.DENSECLIP.CLASS_NAMES filled from the dataset metadata field ``metadata_classes``
    when empty (:func:`resolve_class_names`)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DENSECLIP.LANGUAGE_GUIDED = True
    cfg.MODEL.DENSECLIP.CLASS_NAMES = resolve_class_names(cfg, metadata_classes)
    cfg.freeze()
    return cfg


class DenseCLIPModel:
    """
    Mixed in before a Detectron2 meta-architecture (RetinaNet, GeneralizedRCNN, SemanticSegmentor); makes
    its backbone a :class:`LanguageGuidedBackbone` and adds the auxiliary score-map loss
    (:class:`ScoreMapLoss`, with the task's target rule) and the score maps inference returns.

    Score maps in inference, per input dict: with a ``"vocabulary"`` entry (names, one string of
    comma-separated names, or a :class:`Vocabulary` from ``model.score_map.vocabulary(names)``) the
    output's ``"score_maps"`` are that vocabulary's (any names: the learned contexts and the context
    decoder score them; the head keeps its own classes); without one, the classes' when
    ``return_score_maps`` (MODEL.DENSECLIP.RETURN_SCORE_MAPS). They are K x H x W score-map logits
    (cosine / tau) on the original image.
    """

    @configurable
    def __init__(self, *, score_map_loss: ScoreMapLoss, return_score_maps: bool, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(self.backbone, LanguageGuidedBackbone):
            raise ValueError(
                f"MODEL.META_ARCHITECTURE {type(self).__name__} reads pixel-text score maps, but "
                f"MODEL.BACKBONE.NAME builds a {type(self.backbone).__name__} without them. Use a backbone "
                f"of this project (build_clip_fpn_backbone, build_retinanet_clip_fpn_backbone, ...), or "
                f"a stock meta-architecture (GeneralizedRCNN, RetinaNet, SlidingWindowSemanticSegmentor) "
                f"for a model without language guidance."
            )
        class_names, num_classes, key = self.class_names, head_num_classes(self), task_of(self).num_classes_key
        if len(class_names) != num_classes:
            raise ValueError(
                f"The text prompts have {len(class_names)} classes ({', '.join(class_names[:5])}"
                f"{', ...' if len(class_names) > 5 else ''}) but the head has {num_classes} ({key}). "
                f"Set {key} {len(class_names)} to match the dataset, or fix MODEL.DENSECLIP.CLASS_NAMES."
            )
        self.score_map_loss = score_map_loss
        self.return_score_maps = return_score_maps

    @classmethod
    def from_config(cls, cfg):
        task = task_of(cls)
        ret = super().from_config(language_guided_cfg(cfg, task.metadata_classes))
        ret["score_map_loss"] = ScoreMapLoss(cfg, task)
        ret["return_score_maps"] = cfg.MODEL.DENSECLIP.RETURN_SCORE_MAPS
        return ret

    @property
    def score_map(self) -> PixelTextScoreMap:
        """The score-map module: text encoder, context decoder, vocabularies (``.vocabulary(names)``)."""
        return self.backbone.score_map

    @property
    def class_names(self) -> List[str]:
        return list(self.score_map.class_names)

    def extract_features(self, images: ImageList) -> LanguageGuidedFeatures:
        """The backbone's features, the classes' B x K x h x w score map and the image embeddings."""
        return self.backbone.forward_with_score_map(images.tensor)

    def requested_score_maps(
        self, batched_inputs: List[dict], guided: LanguageGuidedFeatures
    ) -> List[Optional[torch.Tensor]]:
        """Per input, the K x h x w score map inference returns (see the class docstring), or None."""
        maps: List[Optional[torch.Tensor]] = [
            guided.score_map[i] if self.return_score_maps else None for i in range(len(batched_inputs))
        ]
        groups: Dict[Tuple[str, ...], list] = {}
        for index, inputs in enumerate(batched_inputs):
            if inputs.get("vocabulary") is not None:
                vocabulary = self.score_map.vocabulary(inputs["vocabulary"])
                groups.setdefault(vocabulary.names, [vocabulary, []])[1].append(index)
        for names, (vocabulary, indices) in groups.items():
            if list(names) == self.class_names:
                scores = guided.score_map[indices]
            elif len(indices) == len(batched_inputs):  # one vocabulary for the batch (e.g. a predictor's)
                scores = self.score_map(guided.global_embedding, guided.dense_embedding, vocabulary)
            else:
                scores = self.score_map(guided.global_embedding[indices], guided.dense_embedding[indices], vocabulary)
            for score_map, index in zip(scores, indices):
                maps[index] = score_map
        return maps


class DenseCLIPDetector(DenseCLIPModel):
    """
    Mixed in before a Detectron2 detector (RetinaNet, GeneralizedRCNN). Inference returns, per image,
    ``{"instances": Instances}`` on the original image, plus ``"score_maps"`` (see :class:`DenseCLIPModel`).
    """

    def postprocess(
        self, instances: List[Instances], batched_inputs: List[dict], images: ImageList, guided: LanguageGuidedFeatures
    ) -> List[dict]:
        """Per image: instances rescaled to the input's height and width, and the requested score maps
        there too (:func:`score_maps_on_image`)."""
        results = []
        score_maps = self.requested_score_maps(batched_inputs, guided)
        for inst, inputs, image_size, score_map in zip(instances, batched_inputs, images.image_sizes, score_maps):
            height, width = inputs.get("height", image_size[0]), inputs.get("width", image_size[1])
            result = {"instances": postprocess_instances(inst, height, width)}
            if score_map is not None:
                result["score_maps"] = score_maps_on_image(
                    score_map, images.tensor.shape[-2:], image_size, height, width
                )
            results.append(result)
        return results
