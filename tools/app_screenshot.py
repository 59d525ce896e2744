#!/usr/bin/env python
"""
Drive demo/app.py's page in a headless Chromium (Selenium): open it, upload an image, type a
vocabulary, run it, wait for the answer and save a screenshot of the whole page. The browser test
(tests/test_app_browser.py) drives the page with the same functions.

    python tools/app_screenshot.py --url http://127.0.0.1:7860 --image datasets/shapes/val/00001.png \\
        --vocabulary "circle, ring, star, moon" --output demo/app_screenshot.png

Needs the browser-test extra (selenium) and Chromium with its driver; `make test-browser` installs
them. Chromium runs without a sandbox, GPU or any traffic beyond the page (CHROMIUM and CHROMEDRIVER
name other binaries).
"""
import argparse
import os
import tempfile
import time
from typing import List, Optional, Tuple

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
)


def chromium(width: int = 1400, height: int = 1000, user_data_dir: Optional[str] = None) -> webdriver.Chrome:
    """A headless Chromium (a fresh profile unless ``user_data_dir``) driven by the system chromedriver."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir or tempfile.mkdtemp(prefix='chromium-')}")
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    """``condition()``'s first truthy value within ``timeout`` seconds, else TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"Timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class AppPage:
    """demo/app.py's page in one browser tab."""

    def __init__(self, driver: webdriver.Chrome, url: str, timeout: float = 60):
        self.driver, self.url, self.timeout = driver, url, timeout

    def open(self) -> "AppPage":
        self.driver.get(self.url)
        wait_until(lambda: self.driver.find_elements(By.CSS_SELECTOR, "#run"), self.timeout, "the page")
        wait_until(lambda: self.driver.find_elements(By.CSS_SELECTOR, "#image input[type=file]"), self.timeout,
                   "the upload box")
        return self

    def upload(self, path: str) -> None:
        """Put ``path`` in the image box, as choosing it in the file dialog does, and wait for its preview."""
        self.driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(os.path.abspath(path))
        wait_until(lambda: self.driver.find_elements(By.CSS_SELECTOR, "#image img"), self.timeout, "the upload")

    def set_vocabulary(self, text: str) -> None:
        box = self.driver.find_element(By.CSS_SELECTOR, "#vocabulary textarea, #vocabulary input")
        box.clear()
        box.send_keys(text)

    def vocabulary(self) -> str:
        return self.driver.find_element(By.CSS_SELECTOR, "#vocabulary textarea, #vocabulary input").get_attribute("value")

    def click_run(self) -> None:
        """Press Run, after marking the current answer as old (see :meth:`wait_for_answer`)."""
        self.driver.execute_script(
            "document.querySelectorAll('#status [data-request]').forEach(e => e.setAttribute('data-old', '1'))")
        self.driver.find_element(By.CSS_SELECTOR, "#run").click()

    def wait_for_answer(self) -> str:
        """The status line of the answer to the last Run (each answer's line is new), once its pictures
        have loaded."""
        status = wait_until(
            lambda: self.driver.find_elements(By.CSS_SELECTOR, "#status [data-request]:not([data-old])"),
            self.timeout, "the answer")[0]
        wait_until(lambda: self.driver.execute_script(
            "return Array.from(document.querySelectorAll('#prediction img, #word-map img, #heatmaps img'))"
            ".every(img => img.complete)"), self.timeout, "the pictures")
        return status.text

    def run(self) -> str:
        self.click_run()
        return self.wait_for_answer()

    def status(self) -> Tuple[str, bool]:
        """(the status line's text, whether it is an error)."""
        element = wait_until(lambda: self.driver.find_elements(By.CSS_SELECTOR, "#status [data-request]"), self.timeout,
                             "the status line")[0]
        return element.text, "status-error" in element.get_attribute("class")

    def image(self, elem_id: str) -> Optional[dict]:
        """{'src', 'width', 'height'} (natural size) of the picture shown in ``#elem_id``, or None."""
        found = self.driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
        if not found:
            return None
        return self.driver.execute_script(
            "const i = arguments[0]; return {src: i.src, width: i.naturalWidth, height: i.naturalHeight};", found[0])

    def gallery(self) -> List[Tuple[str, str]]:
        """(picture URL, caption) of each heatmap, in order."""
        return [
            (item.find_element(By.CSS_SELECTOR, "img").get_attribute("src"),
             item.find_element(By.CSS_SELECTOR, ".caption-label").text)
            for item in self.driver.find_elements(By.CSS_SELECTOR, "#heatmaps .gallery-item")
        ]

    def table(self) -> List[List[str]]:
        """The table's rows (header first) as the page shows them."""
        header = [cell.text.strip() for cell in self.driver.find_elements(By.CSS_SELECTOR, "#table [role=columnheader]")]
        rows = self.driver.find_elements(By.CSS_SELECTOR, "#table [role=row]:not(:has([role=columnheader]))")
        return [header] + [[cell.text.strip() for cell in row.find_elements(By.CSS_SELECTOR, "[role=gridcell]")]
                           for row in rows]

    def screenshot(self, path: str, width: int = 1400) -> None:
        """The whole page (the window grown to its height) as a PNG."""
        for _ in range(3):  # the layout may reflow at the new size
            height = self.driver.execute_script("return document.documentElement.scrollHeight")
            self.driver.set_window_size(width, height + 100)
            time.sleep(0.5)
        self.driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.3)
        self.driver.save_screenshot(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--image", required=True)
    parser.add_argument("--vocabulary", help="default: the model's classes, as the page fills them in")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args(argv)
    driver = chromium(args.width)
    try:
        page = AppPage(driver, args.url).open()
        page.upload(args.image)
        if args.vocabulary is not None:
            page.set_vocabulary(args.vocabulary)
        print(page.run())
        page.screenshot(args.output, args.width)
        print(f"wrote {args.output}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
