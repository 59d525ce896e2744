#!/usr/bin/env python
"""
DenseCLIP in the browser (Gradio): pick a model, upload an image (or pick a generated val image), type
words, and see the model's prediction, one pixel-text score map per word, the label map over the words
and each word's peak score and area.

    python demo/app.py                                   # the quick-start models under output/
    python demo/app.py --model CONFIG WEIGHTS [--model CONFIG WEIGHTS ...] [--port 7860] [--host 0.0.0.0]

Needs the ``demo`` extra (``pip install -e .[demo]``); ``make demo-app`` installs it and starts this.
Nothing leaves the machine: Gradio's analytics are off and no share link is made.
"""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import argparse  # noqa: E402
import html  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import numpy as np  # noqa: E402

import denseclip  # noqa: F401,E402  (first, so that its warning filters also cover Detectron2's import notices)

from detectron2.data.catalog import Metadata  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor import read_image_bgr  # noqa: E402

from denseclip import get_denseclip_cfg, register_datasets_from_config  # noqa: E402
from denseclip.data.datasets.shapes import default_root  # noqa: E402
from denseclip.engine import DenseCLIPPredictor  # noqa: E402
from denseclip.modeling import parse_vocabulary, task_of  # noqa: E402
from denseclip.utils.visualization import (  # noqa: E402
    colour_bar, draw_sem_seg, enlarge, heatmap, render_prediction, score_map_probabilities,
)

logger = logging.getLogger("denseclip.app")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE_HEADERS = ["name", "peak score", "area above 0.5 (%)", "share of the word label map (%)"]
HEATMAP_SIDE = 256  # heatmaps are drawn on the image enlarged to at least this shorter side


@dataclass(frozen=True)
class ModelChoice:
    """One model the page offers: a config and its trained weights."""

    name: str
    config_file: str
    weights: str
    opts: Tuple[str, ...] = ()


QUICKSTART_MODELS = (
    # (name, config, weights, the command that makes the weights)
    ("Quick-start Mask R-CNN (shapes)", "configs/Shapes-InstanceSegmentation/mask_rcnn_denseclip_tiny_FPN.yaml",
     "output/quickstart/model_final.pth", "make quickstart"),
    ("Quick-start Semantic FPN (shapes)", "configs/Shapes-SemanticSegmentation/semantic_fpn_denseclip_tiny.yaml",
     "output/quickstart_semseg/model_final.pth", "make quickstart-semseg"),
)


def quickstart_models(root: str = REPO) -> Tuple[List[ModelChoice], List[str]]:
    """The quick-start models whose weights exist under ``root``, and for the others a line saying how
    to make them."""
    found, missing = [], []
    for name, config, weights, command in QUICKSTART_MODELS:
        if os.path.isfile(os.path.join(root, weights)):
            found.append(ModelChoice(name, os.path.join(root, config), os.path.join(root, weights)))
        else:
            missing.append(f"{name}: no {weights} yet; {command} trains it (on the CPU, about 6 minutes)")
    return found, missing


@dataclass
class LoadedModel:
    """A predictor built once (weights loaded) and shared by every request."""

    choice: ModelChoice
    predictor: DenseCLIPPredictor
    metadata: Metadata
    semantic: bool

    @property
    def class_names(self) -> List[str]:
        return list(self.predictor.model.class_names)


class ModelStore:
    """
    The page's models, each built on first use and then reused by all requests (one lock per model, so
    two first requests build it once). The predictors return score maps; each request names its own
    vocabulary (the predictor caches each vocabulary's text embeddings), so nothing one request asks
    for is left on the model for the next.
    """

    def __init__(self, choices: Sequence[ModelChoice], device: Optional[str] = None):
        self.choices = {choice.name: choice for choice in choices}
        self.device = device
        self._models: Dict[str, LoadedModel] = {}
        self._locks = {name: threading.Lock() for name in self.choices}

    @property
    def names(self) -> List[str]:
        return list(self.choices)

    def get(self, name: str) -> LoadedModel:
        if name not in self.choices:
            raise ValueError(f"No model named {name!r}; the page offers: {', '.join(self.choices) or 'none'}")
        with self._locks[name]:
            if name not in self._models:
                self._models[name] = self._load(self.choices[name])
            return self._models[name]

    def _load(self, choice: ModelChoice) -> LoadedModel:
        opts = ["MODEL.WEIGHTS", choice.weights, *choice.opts]
        if self.device:
            opts += ["MODEL.DEVICE", self.device]
        if not os.path.isfile(choice.config_file):
            raise FileNotFoundError(f"Config file not found: {choice.config_file}")
        cfg = get_denseclip_cfg(choice.config_file, opts)
        register_datasets_from_config(cfg)
        cfg.freeze()
        start = time.perf_counter()
        predictor = DenseCLIPPredictor(cfg, score_maps=True, complete_weights=True)
        logger.info(f"Loaded {choice.name} in {time.perf_counter() - start:.1f}s")
        metadata = getattr(predictor, "metadata", None) or Metadata(name="__unused")
        return LoadedModel(choice, predictor, metadata, semantic=task_of(cfg).semantic_segmentation)


@dataclass
class Analysis:
    """What the page shows for one image and vocabulary (pictures RGB uint8)."""

    prediction: np.ndarray  # detections (boxes, masks, classes, scores) or the model's label map with a legend
    word_label_map: np.ndarray  # each pixel given the name of its highest score map, with a legend
    heatmaps: List[Tuple[np.ndarray, str]]  # one (heatmap, name) per score map
    colour_bar: np.ndarray
    table: List[list]  # TABLE_HEADERS rows, one per name
    names: List[str]
    summary: str


def analyze(model: LoadedModel, image_bgr: np.ndarray, vocabulary: str, threshold: float = 0.5,
            progress: Optional[Callable[[float, str], None]] = None) -> Analysis:
    """
    Run ``model`` on one BGR image with this call's ``vocabulary`` (comma-separated names, parsed as
    demo.py's --vocabulary; the model's own class names use its cached class embeddings) and draw what
    the page shows. Detections below ``threshold`` are not drawn. Raises ValueError for an empty
    vocabulary or a name that does not fit the prompt (the predictor's message).
    """
    progress = progress or (lambda fraction, text: None)
    names = parse_vocabulary(vocabulary)
    progress(0.3, "Running the model")
    start = time.perf_counter()
    predictions = model.predictor(image_bgr, vocabulary=None if names == model.class_names else names)
    seconds = time.perf_counter() - start
    progress(0.7, "Drawing")
    overlay, _ = render_prediction(image_bgr, predictions, model.metadata, None, threshold)
    names = list(predictions["score_map_names"])
    probabilities, title = score_map_probabilities(predictions)  # as the quick start draws them
    probabilities = probabilities.numpy()
    labels = predictions["score_maps"].argmax(dim=0).cpu().numpy()
    image_rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
    word_label_map = draw_sem_seg(image_rgb, labels, Metadata(name="__words", stuff_classes=names))
    base = enlarge(image_rgb, HEATMAP_SIDE)
    heatmaps = [(heatmap(base, probability), name) for name, probability in zip(names, probabilities)]
    table = [
        [name, round(float(p.max()), 3), round(100 * float((p > 0.5).mean()), 1), round(100 * float((labels == k).mean()), 1)]
        for k, (name, p) in enumerate(zip(names, probabilities))
    ]
    if "sem_seg" in predictions:
        summary = f"label map of the model's {len(model.class_names)} classes"
    else:
        instances = predictions["instances"]
        drawn = int((instances.scores >= threshold).sum())
        summary = f"{drawn} of {len(instances)} detections drawn (score >= {threshold:g})"
    summary += f"; {len(names)} score maps ({title}); model ran in {seconds:.2f}s"
    return Analysis(
        prediction=overlay[:, :, ::-1].copy(),
        word_label_map=word_label_map,
        heatmaps=heatmaps,
        colour_bar=colour_bar(max(512, min(1024, 4 * base.shape[1])), 44, title),
        table=table,
        names=names,
        summary=summary,
    )


# ---------------------------------------------------------------------------------------------- the page

INTRO = """
# DenseCLIP: pixel-text score maps for any words

Pick a model, upload an image (or pick one of the generated val images below it), type comma-separated
words and press **Run**. The page shows the model's own prediction (a detector's boxes, masks, classes
and scores; a semantic segmentor's label map), one **score map per word** (how strongly each pixel
matches the word), the **label map over your words** (each pixel given the word whose score map is
highest there) and each word's peak score and area. The detections and the model's label map keep the
classes it was trained on; the score maps take any words.

**With the quick-start models, words beyond their trained classes (`circle`, `square`, `triangle`,
`star`, `ring`, and `background` for the segmentor) mean little**: they were trained from random
weights, with a random, frozen text encoder, so a new word gets an embedding unrelated to its meaning.
With a converted released model (trained from CLIP's weights) the maps of words CLIP knows are meaningful.
"""


def _status(text: str, error: bool = False) -> str:
    """The status line's HTML; each carries a new request id, so that the page redraws it even when the
    text repeats (and a script driving the page can tell a new answer from the last one)."""
    colour = "#b91c1c" if error else "inherit"
    prefix = "<b>Error:</b> " if error else ""
    kind = "error" if error else "info"
    return (f'<div class="status-{kind}" data-request="{uuid.uuid4().hex[:12]}" style="color:{colour}">'
            f"{prefix}{html.escape(text)}</div>")


def _upload(payload) -> Tuple[Optional[str], Optional[str]]:
    """(server path, the file's own name) of the image component's value (unprocessed: the app reads the
    file itself, so that an unreadable upload gets demo.py's message)."""
    if not payload:
        return None, None
    if isinstance(payload, str):
        return payload, os.path.basename(payload)
    path = payload.get("path")
    return path, payload.get("orig_name") or (os.path.basename(path) if path else None)


def run_request(store: ModelStore, model_name: str, image_payload, vocabulary: str, threshold: float,
                progress: Optional[Callable[[float, str], None]] = None):
    """The page's outputs for one submission: (status html, prediction, word label map, heatmaps,
    colour bar, table rows). Every error becomes the status message (the server carries on)."""
    progress = progress or (lambda fraction, text: None)
    try:
        if not model_name:
            raise ValueError(no_model_help())
        path, name = _upload(image_payload)
        if path is None:
            raise ValueError("No image: upload one or pick one of the generated val images")
        progress(0.05, "Loading the model (once)")
        model = store.get(model_name)
        progress(0.2, "Reading the image")
        image = read_image_bgr(path, name)
        result = analyze(model, image, vocabulary, float(threshold), progress)
    except Exception as e:  # shown in the page; the traceback goes to the server's log
        logger.warning("Request failed: %s", e, exc_info=not isinstance(e, (ValueError, OSError)))
        return _status(str(e), error=True), None, None, [], None, []
    status = _status(f"{model_name} on {name}: {result.summary}.")
    return status, result.prediction, result.word_label_map, result.heatmaps, result.colour_bar, result.table


def model_classes(store: ModelStore, model_name: str) -> Tuple[str, str]:
    """(vocabulary box value, status html) for a model: its class names, or the error loading it."""
    try:
        model = store.get(model_name)
    except Exception as e:
        logger.warning("Loading %s failed: %s", model_name, e)
        return "", _status(str(e), error=True)
    kind = "semantic segmentor" if model.semantic else "detector"
    return ", ".join(model.class_names), _status(f"{model_name}: a {kind}; its classes are in the vocabulary box.")


def no_model_help(missing: Sequence[str] = ()) -> str:
    """What to do when the page has no model: how to make the quick-start models (``missing``, or those
    missing now), or name others."""
    lines = list(missing) or quickstart_models()[1]
    return ("No model to run. " + "; ".join(lines) +
            ". Or start the app with --model CONFIG WEIGHTS (trained weights of that config).")


def example_images(folder: str, count: int = 8) -> List[str]:
    if not folder or not os.path.isdir(folder):
        return []
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg")))
    return [os.path.join(folder, f) for f in files[:count]]


def build_app(store: ModelStore, examples: Sequence[str] = (), concurrency: int = 2, missing: Sequence[str] = ()):
    """The Gradio page. Inference runs in Gradio's worker threads (up to ``concurrency`` requests at
    once, each with its own model choice and vocabulary) while the page shows its progress."""
    import gradio as gr

    default = store.names[0] if store.names else None
    default_vocabulary = ""
    start_status = ""
    if default is not None:
        default_vocabulary, start_status = model_classes(store, default)
    else:
        start_status = _status(no_model_help(missing), error=True)
    if missing and default is not None:
        start_status += _status("Not available: " + "; ".join(missing))

    with gr.Blocks(title="DenseCLIP demo") as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                model = gr.Dropdown(store.names, value=default, label="Model", elem_id="model")
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], elem_id="image",
                                 height=300)
                if examples:
                    gr.Examples(examples=[[path] for path in examples], inputs=[image], label="Generated val images",
                                examples_per_page=len(examples), elem_id="examples")
                vocabulary = gr.Textbox(default_vocabulary, label="Vocabulary (comma-separated names)",
                                        placeholder="circle, ring, moon", elem_id="vocabulary")
                with gr.Row():
                    classes = gr.Button("The model's classes", size="sm", elem_id="classes")
                    submit = gr.Button("Run", variant="primary", elem_id="run")
                threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.05, elem_id="threshold",
                                      label="Detection score threshold (detectors)")
            with gr.Column(scale=3):
                status = gr.HTML(start_status, elem_id="status")
                with gr.Row():
                    prediction = gr.Image(label="Prediction (the model's classes)", format="png", interactive=False,
                                          elem_id="prediction")
                    word_map = gr.Image(label="Label map over the words", format="png", interactive=False,
                                        elem_id="word-map")
                heatmaps = gr.Gallery(label="Score map of each name", format="png", columns=4, object_fit="contain",
                                      elem_id="heatmaps")
                bar = gr.Image(show_label=False, format="png", interactive=False, elem_id="colour-bar", height=56,
                               container=False, buttons=[])
                table = gr.Dataframe(headers=TABLE_HEADERS, label="Each name's peak score and area", interactive=False,
                                     elem_id="table")

        def run(model_name, image_payload, words, score_threshold, progress=gr.Progress()):
            return run_request(store, model_name, image_payload, words, score_threshold,
                               lambda fraction, text: progress(fraction, desc=text))

        def fill(model_name, progress=gr.Progress()):
            progress(0.1, desc="Loading the model (once)")
            return model_classes(store, model_name)

        inputs = [model, image, vocabulary, threshold]
        outputs = [status, prediction, word_map, heatmaps, bar, table]
        options = dict(preprocess=False, concurrency_limit=concurrency, concurrency_id="inference")
        submit.click(run, inputs, outputs, api_name="run", **options)  # also the API: gradio_client's predict(api_name="/run")
        vocabulary.submit(run, inputs, outputs, api_visibility="private", **options)
        threshold.release(run, inputs, outputs, api_visibility="private", **options)
        fill_options = dict(concurrency_limit=concurrency, concurrency_id="inference")
        model.change(fill, [model], [vocabulary, status], api_name="model_classes", **fill_options)
        classes.click(fill, [model], [vocabulary, status], api_visibility="private", **fill_options)
    return app


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs=2, action="append", default=[], metavar=("CONFIG", "WEIGHTS"),
                        help="a model the page offers (repeatable; first is the default); default: the "
                        "quick-start models whose weights exist under output/")
    parser.add_argument("--device", default=None, help="MODEL.DEVICE for every model (default: each config's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: the whole network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--examples", default=os.path.join(default_root(), "val"),
                        help="folder of example images (default: the generated shapes' val split)")
    parser.add_argument("--concurrency", type=int, default=2, help="requests that run at once")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="denseclip")
    if args.model:
        choices = [ModelChoice(f"{os.path.splitext(os.path.basename(config))[0]} ({weights})", config, weights)
                   for config, weights in args.model]
        missing = []
    else:
        choices, missing = quickstart_models()
    store = ModelStore(choices, args.device)
    for line in missing:
        print(f"[app] {line}")
    if not choices:
        print("[app] " + no_model_help(missing))
    examples = example_images(args.examples)
    app = build_app(store, examples, args.concurrency, missing)
    launch(app, args.host, args.port, examples_folder=args.examples if examples else None)


CSS = """
#heatmaps .grid-wrap { min-height: 0; max-height: none; overflow-y: visible; }
#status { min-height: 2.5em; }
"""


def launch(app, host: str = "127.0.0.1", port: int = 7860, examples_folder: Optional[str] = None, **kwargs):
    """Serve the page: on this machine only (no share link, no analytics, no server-side rendering, no
    MCP server), the examples' folder readable by the page. Returns Gradio's (app, local URL, share URL)."""
    app.queue()  # each event sets its own concurrency limit (build_app)
    return app.launch(server_name=host, server_port=port, share=False, show_error=True, ssr_mode=False,
                      mcp_server=False, css=CSS,
                      allowed_paths=[os.path.abspath(examples_folder)] if examples_folder else None, **kwargs)


if __name__ == "__main__":
    main()
