"""demo/app.py without a browser: what it draws and tabulates for an image and a vocabulary, its error
messages (demo.py's), one model load shared by all requests, per-request vocabularies under concurrent
requests, and, with gradio installed, the page served to two concurrent API clients."""
import os
import socket
import threading

import cv2
import numpy as np
import pytest

from denseclip.modeling import parse_vocabulary

from helpers import SHAPES_SEMSEG_CONFIG, TINY_SHAPES_CONFIGS, load_script, run_in_threads, save_shapes_checkpoint

DETECTOR_CONFIG = TINY_SHAPES_CONFIGS["mask_rcnn"]
CLASSES = ["circle", "square", "triangle", "star", "ring"]
LONG_NAME = "an extraordinarily elaborate teapot"


@pytest.fixture(scope="module")
def app():
    return load_script("demo/app.py")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Random-weight quick-start models saved as trained ones: a detector that finds confident `circle`
    boxes, a semantic segmentor, and the segmentor's weights mislabelled as the detector's."""
    folder = tmp_path_factory.mktemp("app_models")
    return {
        "detector": (DETECTOR_CONFIG, save_shapes_checkpoint(DETECTOR_CONFIG, str(folder / "det.pth"), confident_class=0)),
        "segmentor": (SHAPES_SEMSEG_CONFIG, save_shapes_checkpoint(SHAPES_SEMSEG_CONFIG, str(folder / "seg.pth"))),
        "misfit": (DETECTOR_CONFIG, str(folder / "seg.pth")),
    }


@pytest.fixture(scope="module")
def store(app, checkpoints):
    from helpers import REPO

    return app.ModelStore([app.ModelChoice(name, os.path.join(REPO, config), weights)
                           for name, (config, weights) in checkpoints.items()])


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    """A 128 x 128 picture: a disc and a square on a flat background."""
    image = np.full((128, 128, 3), (40, 90, 30), np.uint8)
    cv2.circle(image, (40, 40), 22, (30, 200, 230), -1)
    image[70:110, 70:110] = (200, 60, 40)
    path = str(tmp_path_factory.mktemp("images") / "shapes.png")
    cv2.imwrite(path, image)
    return path


def upload(path):
    """The image box's value as the page sends it (a file Gradio stored, under the upload's own name)."""
    return {"path": path, "orig_name": os.path.basename(path)}


def test_detector_pictures_and_table(app, store, image_path):
    model = store.get("detector")
    image = cv2.imread(image_path)
    result = app.analyze(model, image, "circle, red ring, moon", threshold=0.5)
    assert result.names == ["circle", "red ring", "moon"]
    # the detections drawn on the image, enlarged 4x (Detectron2's Visualizer, shorter side 512)
    assert result.prediction.shape == (512, 512, 3) and result.prediction.dtype == np.uint8
    plain = cv2.resize(image[:, :, ::-1], (512, 512), interpolation=cv2.INTER_LINEAR).astype(int)
    changed = (np.abs(result.prediction.astype(int) - plain).max(axis=2) > 40).mean()
    assert changed > 0.02, "the confident boxes are drawn"
    assert "20 of 20 detections drawn" in result.summary
    # one heatmap per name, captioned with the name, on the image enlarged to 256 px
    assert [name for _, name in result.heatmaps] == ["circle", "red ring", "moon"]
    assert all(tile.shape == (256, 256, 3) for tile, _ in result.heatmaps)
    assert result.colour_bar.shape[0] == 44 and result.colour_bar.shape[1] >= 512
    # the label map over the words: the image at 512 px with a legend below
    assert result.word_label_map.shape[1] == 512 and result.word_label_map.shape[0] > 512
    # the table: each name's peak sigmoid and areas, against the predictor's own score maps
    maps = model.predictor(image, vocabulary=["circle", "red ring", "moon"])["score_maps"].float()
    probabilities, labels = maps.sigmoid(), maps.argmax(dim=0)
    for k, (name, peak, above, share) in enumerate(result.table):
        assert name == result.names[k]
        assert peak == pytest.approx(probabilities[k].max().item(), abs=1e-3)
        assert above == pytest.approx(100 * (probabilities[k] > 0.5).float().mean().item(), abs=0.1)
        assert share == pytest.approx(100 * (labels == k).float().mean().item(), abs=0.1)
    assert sum(row[3] for row in result.table) == pytest.approx(100, abs=0.2)


def test_threshold_hides_detections(app, store, image_path):
    image = cv2.imread(image_path)
    result = app.analyze(store.get("detector"), image, "circle", threshold=1.0)
    assert "0 of 20 detections drawn (score >= 1)" in result.summary


def test_the_models_classes_are_its_own_score_maps(app, store, image_path):
    """Typing exactly the model's classes gives the maps of the model's cached class embeddings."""
    model = store.get("detector")
    assert model.class_names == CLASSES
    image = cv2.imread(image_path)
    result = app.analyze(model, image, ", ".join(CLASSES))
    own = model.predictor(image)["score_maps"].float().sigmoid()
    assert [row[0] for row in result.table] == CLASSES
    assert [row[1] for row in result.table] == pytest.approx([p.max().item() for p in own], abs=1e-3)


def test_semantic_segmentor_label_map_and_softmax_maps(app, store, image_path):
    model = store.get("segmentor")
    assert model.semantic and model.class_names == CLASSES + ["background"]
    result = app.analyze(model, cv2.imread(image_path), "circle, square, sky")
    assert result.prediction.shape[1] == 512 and result.prediction.shape[0] > 512  # label map and its legend
    assert "label map of the model's 6 classes" in result.summary and "softmax(score)" in result.summary
    assert [name for _, name in result.heatmaps] == ["circle", "square", "sky"]
    assert all(0 <= row[1] <= 1 for row in result.table)


def test_requests_report_progress(app, store, image_path):
    stages = []
    app.run_request(store, "detector", upload(image_path), "circle", 0.5, lambda f, text: stages.append((f, text)))
    fractions = [f for f, _ in stages]
    assert fractions == sorted(fractions) and {"Running the model", "Drawing"} <= {text for _, text in stages}


def page_error(app, store, model, image, vocabulary):
    status, *pictures, table = app.run_request(store, model, image, vocabulary, 0.5)
    assert 'class="status-error"' in status and pictures[:2] == [None, None] and pictures[2] == [] and table == []
    import html

    return html.unescape(status.split("<b>Error:</b> ", 1)[1].rsplit("</div>", 1)[0])


def cli_error(demo, config, weights, image, vocabulary=None):
    from helpers import REPO

    args = ["--config-file", os.path.join(REPO, config), "--input", image, "--output", os.path.dirname(image) + "/out"]
    if vocabulary is not None:
        args += ["--vocabulary", vocabulary]
    with pytest.raises(ValueError) as error:
        demo.main([*args, "--opts", "MODEL.WEIGHTS", weights])
    return str(error.value)


@pytest.fixture(scope="module")
def demo():
    return load_script("demo/demo.py")


def test_bad_input_gets_the_command_lines_message(app, store, demo, checkpoints, image_path, tmp_path):
    """An unreadable image, an over-long name, an empty vocabulary and weights of another config: the page
    shows demo.py's message (for an upload, under the file's own name) and the server carries on."""
    broken = tmp_path / "holiday.png"
    broken.write_bytes(b"not a picture")
    stored = tmp_path / "gradio_upload_1234"  # where Gradio keeps an upload: the page names it holiday.png
    stored.mkdir()
    (stored / "holiday.png").write_bytes(b"not a picture")
    config, weights = checkpoints["detector"]
    page = page_error(app, store, "detector", {"path": str(stored / "holiday.png"), "orig_name": "holiday.png"}, "circle")
    assert page == cli_error(demo, config, weights, str(broken)).replace(str(broken), "holiday.png")
    assert page.startswith("Cannot read holiday.png as an image: ") and str(tmp_path) not in page

    page = page_error(app, store, "detector", upload(image_path), f"circle, {LONG_NAME}")
    assert page == cli_error(demo, config, weights, image_path, f"circle, {LONG_NAME}")
    assert LONG_NAME in page and "Shorten these names" in page

    for empty in ("", "  "):
        page = page_error(app, store, "detector", upload(image_path), empty)
        assert page == cli_error(demo, config, weights, image_path, empty)
        assert page.startswith("The vocabulary is empty")
    page = page_error(app, store, "detector", upload(image_path), "circle,,ring")
    assert "empty name (position 2)" in page

    misfit_config, misfit_weights = checkpoints["misfit"]
    page = page_error(app, store, "misfit", upload(image_path), "circle")
    assert page == cli_error(demo, misfit_config, misfit_weights, image_path)
    assert page.startswith(f"MODEL.WEIGHTS {misfit_weights} does not fit the config (DenseCLIPRCNN)")
    assert "roi_heads.box_head" in page and "give the config they were trained with" in page

    assert "No image" in page_error(app, store, "detector", None, "circle")
    # and the page carries on
    status = app.run_request(store, "detector", upload(image_path), "circle", 0.5)[0]
    assert 'class="status-info"' in status


def test_missing_quickstart_models_say_how_to_make_them(app, tmp_path):
    found, missing = app.quickstart_models(str(tmp_path))
    assert found == [] and len(missing) == 2
    assert "make quickstart trains it" in missing[0] and "make quickstart-semseg trains it" in missing[1]
    store = app.ModelStore([])
    status = app.run_request(store, None, None, "circle", 0.5)[0]
    assert "No model to run" in status and "make quickstart" in status and "--model CONFIG WEIGHTS" in status
    os.makedirs(tmp_path / "output" / "quickstart")
    (tmp_path / "output" / "quickstart" / "model_final.pth").write_bytes(b"")
    found, missing = app.quickstart_models(str(tmp_path))
    assert [choice.weights for choice in found] == [str(tmp_path / "output" / "quickstart" / "model_final.pth")]
    assert len(missing) == 1


def test_a_model_is_built_once_for_all_requests(app, checkpoints, monkeypatch):
    built = []
    real = app.DenseCLIPPredictor

    def counting(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(app, "DenseCLIPPredictor", counting)
    from helpers import REPO

    config, weights = checkpoints["detector"]
    store = app.ModelStore([app.ModelChoice("m", os.path.join(REPO, config), weights)])
    models = [None] * 4
    run_in_threads(lambda i: models.__setitem__(i, store.get("m")), range(4))
    assert len(built) == 1 and all(model is models[0] for model in models)
    assert store.get("m") is models[0] and len(built) == 1


class TogetherPredictor:
    """A predictor whose calls wait until ``parties`` calls are inside it at once: requests that get
    through ran concurrently."""

    def __init__(self, predictor, parties=2):
        self.predictor, self.barrier = predictor, threading.Barrier(parties, timeout=120)

    def __getattr__(self, name):
        return getattr(self.predictor, name)

    def __call__(self, *args, **kwargs):
        self.barrier.wait()
        return self.predictor(*args, **kwargs)


VOCABULARIES = ("circle, moon", "square, sun, teapot")


def expected_tables(app, store, image_path):
    image = cv2.imread(image_path)
    return {v: app.analyze(store.get("detector"), image, v).table for v in VOCABULARIES}


def test_concurrent_requests_each_get_their_own_vocabulary(app, store, image_path, monkeypatch):
    expected = expected_tables(app, store, image_path)
    model = store.get("detector")
    monkeypatch.setattr(model, "predictor", TogetherPredictor(model.predictor))
    results = {}

    def request(vocabulary):
        results[vocabulary] = app.run_request(store, "detector", upload(image_path), vocabulary, 0.5)

    run_in_threads(request, VOCABULARIES)
    for vocabulary in VOCABULARIES:
        status, _, _, heatmaps, _, table = results[vocabulary]
        assert 'class="status-info"' in status
        assert [name for _, name in heatmaps] == parse_vocabulary(vocabulary)
        assert table == expected[vocabulary]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_page_serves_two_concurrent_clients(app, store, image_path, monkeypatch):
    """The page itself (Gradio's server and queue): two API clients submit different vocabularies; both
    requests are inside the model at once and each gets its own names' maps."""
    pytest.importorskip("gradio", reason="gradio is not installed: `make demo-app` or pip install -e .[demo]")
    from gradio_client import Client, handle_file

    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    expected = expected_tables(app, store, image_path)
    model = store.get("detector")
    monkeypatch.setattr(model, "predictor", TogetherPredictor(model.predictor))
    page = app.build_app(store, examples=[image_path], concurrency=2)
    port = free_port()
    app.launch(page, port=port, examples_folder=os.path.dirname(image_path), prevent_thread_lock=True, quiet=True)
    try:
        results = {}

        def submit(vocabulary):
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            results[vocabulary] = client.predict("detector", handle_file(image_path), vocabulary, 0.5, api_name="/run")

        threads = [threading.Thread(target=submit, args=(v,)) for v in VOCABULARIES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        for vocabulary in VOCABULARIES:
            status, prediction, word_map, heatmaps, bar, table = results[vocabulary]
            assert "status-info" in status and "shapes.png" in status
            assert [item["caption"] for item in heatmaps] == parse_vocabulary(vocabulary)
            assert cv2.imread(prediction).shape == (512, 512, 3)
            assert table["data"] == expected[vocabulary]
    finally:
        page.close()


def test_page_lists_the_models_and_fills_in_their_classes(app, store):
    pytest.importorskip("gradio", reason="gradio is not installed: `make demo-app` or pip install -e .[demo]")
    page = app.build_app(store, concurrency=2)
    config = page.get_config_file()
    dropdown = next(c for c in config["components"] if c["props"].get("elem_id") == "model")
    assert [choice[0] for choice in dropdown["props"]["choices"]] == ["detector", "segmentor", "misfit"]
    box = next(c for c in config["components"] if c["props"].get("elem_id") == "vocabulary")
    assert box["props"]["value"] == ", ".join(CLASSES)
    vocabulary, status = app.model_classes(store, "segmentor")
    assert vocabulary == ", ".join(CLASSES + ["background"]) and "semantic segmentor" in status
    vocabulary, status = app.model_classes(store, "misfit")
    assert vocabulary == "" and "does not fit" in status
