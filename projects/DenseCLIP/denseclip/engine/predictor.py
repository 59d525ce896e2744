"""Single-image inference that can also return DenseCLIP's pixel-text score maps, for any names."""
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from ..checkpoint import DenseCLIPCheckpointer
from ..config import check_device
from ..data import build_test_resize
from ..modeling import DenseCLIPModel, Vocabulary

__all__ = ["DenseCLIPPredictor"]

Names = Union[None, str, Sequence[str], Vocabulary]


class DenseCLIPPredictor(DefaultPredictor):
    """
    Detectron2's DefaultPredictor (a BGR image in, the model's output for it out), loading
    MODEL.WEIGHTS with DenseCLIPCheckpointer.

    Score maps (DenseCLIP models only): with ``score_maps`` every output also holds "score_maps", K x H x W
    score-map logits on the image, of the model's classes, or of ``vocabulary``: any names the learned
    prompts and context decoder can score (the detections keep the detector's own classes). A call may
    name its own vocabulary instead (``predictor(image, vocabulary=...)``: several callers can share one
    predictor). A vocabulary is a list of names or one string of comma-separated names, split as
    demo.py's --vocabulary; it is tokenized once and its text embeddings are cached. The output then
    also holds "score_map_names", the K names in order.
    """

    def __init__(self, cfg, score_maps: bool = False, vocabulary: Names = None, complete_weights: bool = False):
        """With ``complete_weights``, weights that leave part of the model unloaded (trained with another
        config) are refused (ValueError) instead of Detectron2's warning; see
        :meth:`DenseCLIPCheckpointer.check_complete`."""
        check_device(cfg)
        self.cfg = cfg.clone()
        if score_maps or vocabulary is not None:
            self.cfg.defrost()
            self.cfg.MODEL.DENSECLIP.RETURN_SCORE_MAPS = True
        self.model = build_model(self.cfg).eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        checkpointer = DenseCLIPCheckpointer(self.model, text_weights=cfg.MODEL.DENSECLIP.TEXT_WEIGHTS)
        checkpointer.load(cfg.MODEL.WEIGHTS)
        if complete_weights:
            checkpointer.check_complete(f"the config ({cfg.MODEL.META_ARCHITECTURE})")
        self.aug = build_test_resize(cfg)  # Detectron2's test resize, interpolated as INPUT.RESIZE_BACKEND says
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {self.input_format!r}")
        self.vocabulary = self.prepare_vocabulary(vocabulary) if vocabulary is not None else None
        if score_maps and not isinstance(self.model, DenseCLIPModel):
            self._refuse_score_maps()

    def _refuse_score_maps(self):
        raise ValueError(
            f"Score maps need a DenseCLIP meta-architecture; {self.cfg.MODEL.META_ARCHITECTURE} has none "
            f"(the CLIP baseline)"
        )

    def prepare_vocabulary(self, names: Names) -> Vocabulary:
        """``names`` parsed and tokenized by the model (a clear error for a name that does not fit)."""
        if not isinstance(self.model, DenseCLIPModel):
            self._refuse_score_maps()
        return self.model.score_map.vocabulary(names)

    @property
    def score_map_names(self) -> List[str]:
        """The names of the default score maps: the vocabulary's, or the model's classes."""
        return list(self.vocabulary.names) if self.vocabulary is not None else self.model.class_names

    def __call__(self, original_image: np.ndarray, vocabulary: Names = None) -> dict:
        """
        Args:
            original_image: H x W x 3 uint8 image in BGR order (as cv2.imread gives).
            vocabulary: names of this call's score maps (default: the predictor's).
        Returns:
            the model's output for the image ("instances" or "sem_seg", and "score_maps" with
            "score_map_names" when there are score maps).
        """
        vocabulary = self.prepare_vocabulary(vocabulary) if vocabulary is not None else self.vocabulary
        with torch.no_grad():
            if self.input_format == "RGB":
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            image = self.aug.get_transform(original_image).apply_image(original_image)
            image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1)).to(self.cfg.MODEL.DEVICE)
            inputs = {"image": image, "height": height, "width": width}
            if vocabulary is not None:
                inputs["vocabulary"] = vocabulary
            output = self.model([inputs])[0]
        if "score_maps" in output:
            output["score_map_names"] = list(vocabulary.names) if vocabulary is not None else self.model.class_names
        return output
