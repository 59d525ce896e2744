"""demo/app.py's page in a real browser: the app is started on a free port with a small model, and a
headless Chromium (Selenium) uploads a generated image, types a vocabulary, runs it and reads what the
page shows. `make test-browser` installs what these need (the demo and browser-test extras, Chromium)."""
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request

import cv2
import numpy as np
import pytest

from helpers import REPO, TINY_SHAPES_CONFIGS, load_script, save_shapes_checkpoint

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CONFIG = TINY_SHAPES_CONFIGS["mask_rcnn"]
LONG_NAME = "an extraordinarily elaborate teapot"


def missing_for_the_browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    missing += [f"the {module} package" for module in ("selenium", "gradio") if importlib.util.find_spec(module) is None]
    return missing


@pytest.fixture(scope="module")
def page_tools():
    missing = missing_for_the_browser()
    if missing:
        pytest.skip(f"no browser to test the demo page in (missing: {', '.join(missing)}); "
                    f"`make test-browser` installs Chromium, selenium and gradio and runs these tests")
    return load_script("tools/app_screenshot.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(page_tools, tmp_path_factory):
    """demo/app.py on a free port with a small detector (random weights scoring every box `circle`, so it
    draws boxes) and a few generated val images as its examples: (url, val folder)."""
    from denseclip.data.datasets.shapes import generate_shapes_dataset

    folder = tmp_path_factory.mktemp("app_browser")
    generate_shapes_dataset(str(folder / "shapes"), num_train=0, num_val=3)
    weights = save_shapes_checkpoint(CONFIG, str(folder / "detector.pth"), confident_class=0)
    port, log = free_port(), open(folder / "app.log", "w")
    process = subprocess.Popen(
        [sys.executable, "demo/app.py", "--model", CONFIG, weights, "--port", str(port), "--device", "cpu",
         "--examples", str(folder / "shapes" / "val")],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"),
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("demo/app.py did not start:\n" + open(folder / "app.log").read()[-3000:])
                time.sleep(1)
        yield url, str(folder / "shapes" / "val")
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def browser(page_tools):
    driver = page_tools.chromium(1400, 1200)
    yield driver
    driver.quit()


def fetch_image(url: str) -> np.ndarray:
    """A picture the page shows, as RGB."""
    data = np.frombuffer(urllib.request.urlopen(url, timeout=30).read(), np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1]


def test_upload_type_run_and_read_the_results(page_tools, server, browser):
    url, val = server
    page = page_tools.AppPage(browser, url).open()
    body = browser.find_element("tag name", "body").text
    assert "words beyond their trained classes" in body and "mean little" in body  # the random-weights caveat
    assert page.vocabulary() == "circle, square, triangle, star, ring"  # the model's classes to start with

    image_path = os.path.join(val, "00000.png")
    page.upload(image_path)
    page.set_vocabulary("circle, ring, moon")
    status = page.run()
    text, error = page.status()
    assert not error and text == status
    assert "00000.png" in status and "20 of 20 detections drawn (score >= 0.5)" in status

    # the prediction: the 128 px image enlarged to 512 px, with the boxes drawn where the model found them
    prediction = page.image("prediction")
    assert (prediction["width"], prediction["height"]) == (512, 512)
    shown = fetch_image(prediction["src"]).astype(int)
    plain = cv2.resize(cv2.imread(image_path)[:, :, ::-1], (512, 512), interpolation=cv2.INTER_LINEAR).astype(int)
    assert shown.shape == plain.shape
    assert (np.abs(shown - plain).max(axis=2) > 40).mean() > 0.02

    # one heatmap per name, captioned with the names, each the image enlarged to 256 px
    gallery = page.gallery()
    assert [caption for _, caption in gallery] == ["circle", "ring", "moon"]
    for src, _ in gallery:
        assert fetch_image(src).shape == (256, 256, 3)
    assert len({src for src, _ in gallery}) == 3
    # the label map over the words (with its legend), the colour bar and the table
    word_map = page.image("word-map")
    assert word_map["width"] == 512 and word_map["height"] > 512
    assert page.image("colour-bar")["width"] >= 512
    rows = page.table()
    assert rows[0] == ["name", "peak score", "area above 0.5 (%)", "share of the word label map (%)"]
    assert [row[0] for row in rows[1:]] == ["circle", "ring", "moon"]
    assert all(0 <= float(row[1]) <= 1 for row in rows[1:])
    assert sum(float(row[3]) for row in rows[1:]) == pytest.approx(100, abs=0.5)

    # nothing was fetched from anywhere but the app
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(url) for r in resources), [r for r in resources if not r.startswith(url)]


def test_errors_show_in_the_page_and_the_server_carries_on(page_tools, server, browser, tmp_path):
    url, val = server
    page = page_tools.AppPage(browser, url).open()
    # a generated val image picked from the examples
    browser.find_elements("css selector", "#examples button.gallery-item")[0].click()
    page_tools.wait_until(lambda: browser.find_elements("css selector", "#image img"), 60, "the example image")
    page.set_vocabulary(f"circle, {LONG_NAME}")
    text = page.run()
    assert page.status()[1]
    assert text.startswith("Error: Class names too long for MODEL.DENSECLIP.PROMPT_LENGTH=5")
    assert f"'{LONG_NAME}' (" in text and "Shorten these names" in text
    assert page.gallery() == [] and page.image("prediction") is None

    page.set_vocabulary(" ")
    assert page.run().startswith("Error: The vocabulary is empty")

    broken = tmp_path / "holiday.png"
    broken.write_bytes(b"not a picture")
    page.upload(str(broken))
    page.set_vocabulary("circle")
    text = page.run()
    assert text.startswith("Error: Cannot read holiday.png as an image")

    page.upload(os.path.join(val, "00001.png"))
    text = page.run()  # the same server answers the next request
    assert not page.status()[1] and "00001.png" in text
    assert [caption for _, caption in page.gallery()] == ["circle"]


def test_two_tabs_with_different_vocabularies_at_once(page_tools, server, browser):
    """Two tabs submit at the same time; each gets its own words' maps."""
    url, val = server
    vocabularies = {"first": "circle, moon", "second": "square, sun, teapot"}
    tabs = {}
    for index, name in enumerate(vocabularies):
        if index:
            browser.switch_to.new_window("tab")
        tabs[name] = (browser.current_window_handle, page_tools.AppPage(browser, url).open())
        tabs[name][1].upload(os.path.join(val, f"0000{index}.png"))
        tabs[name][1].set_vocabulary(vocabularies[name])
    for name, (handle, page) in tabs.items():
        browser.switch_to.window(handle)
        page.click_run()
    for index, (name, (handle, page)) in enumerate(tabs.items()):
        browser.switch_to.window(handle)
        status = page.wait_for_answer()
        assert not page.status()[1] and f"0000{index}.png" in status
        assert [caption for _, caption in page.gallery()] == [w.strip() for w in vocabularies[name].split(",")]
        assert [row[0] for row in page.table()[1:]] == [w.strip() for w in vocabularies[name].split(",")]
