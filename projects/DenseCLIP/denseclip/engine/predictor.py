"""Single-image inference that can also return DenseCLIP's pixel-text score maps, for any names."""
from typing import List, Optional, Sequence, Union

import detectron2.data.transforms as T
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from ..checkpoint import DenseCLIPCheckpointer
from ..config import check_device
from ..modeling import DenseCLIPModel

__all__ = ["DenseCLIPPredictor"]


class DenseCLIPPredictor(DefaultPredictor):
    """
    Detectron2's DefaultPredictor (a BGR image in, the model's output for it out), loading
    MODEL.WEIGHTS with DenseCLIPCheckpointer.

    With ``score_maps`` (DenseCLIP models only) the output also holds "score_maps", K x H x W
    score-map logits on the image, for :attr:`score_map_names`: the model's classes, or
    ``vocabulary``, any names the learned prompts and context decoder can score (the detections
    keep the detector's own classes). A vocabulary is a list of names or one string of comma-separated
    names, split as demo.py's --vocabulary (:func:`denseclip.data.parse_vocabulary`).
    """

    def __init__(
        self, cfg, score_maps: bool = False, vocabulary: Optional[Union[str, Sequence[str]]] = None
    ):
        # DefaultPredictor.__init__ with DenseCLIP's checkpointer (clear errors, CLIP files).
        check_device(cfg)
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg).eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        DenseCLIPCheckpointer(self.model, text_weights=cfg.MODEL.DENSECLIP.TEXT_WEIGHTS).load(cfg.MODEL.WEIGHTS)
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {self.input_format!r}")
        if score_maps or vocabulary is not None:
            if not isinstance(self.model, DenseCLIPModel):
                raise ValueError(
                    f"Score maps need a DenseCLIP meta-architecture; {cfg.MODEL.META_ARCHITECTURE} has none "
                    f"(the CLIP baseline)"
                )
            self.model.return_score_maps = True
            self.model.vocabulary = vocabulary

    @property
    def score_map_names(self) -> List[str]:
        return self.model.score_map_names
