"""The /ui/ playground in headless Chromium (Debian's package, driven by Playwright) against the real
service on the tiny model: generate, watch progress (the task's event stream) and its previews, see the image and
the gallery, cancel.

CI installs: ``apt-get install -y chromium`` and ``pip install playwright==1.65.2`` (no
``playwright install``: the browser is Debian's). Without them these tests are skipped.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from .conftest import REPO

pytestmark = pytest.mark.e2e
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (CI: pip install playwright==1.65.2)")
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (CI: apt-get install -y chromium)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    yield page
    context.close()


def test_generate_shows_the_image_and_remembers_it(server, page):
    submits = []
    page.on("request", lambda r: submits.append(r) if r.url.endswith("/jobs/submit") else None)
    page.goto(f"{server.url}/ui/")
    assert page.title() == "sdxl-bento playground"
    for label in ("Prompt", "Negative prompt", "Size", "Steps", "Seed", "Refiner"):  # every control is labelled
        assert page.get_by_label(label, exact=False).first.is_visible()
    page.click("#key-settings summary")
    page.fill("#api-key", "sk-sdxl-test")
    page.dispatch_event("#api-key", "change")
    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#negative-prompt", "fog")
    page.select_option("#size", "256x256")
    page.fill("#steps", "4")
    page.select_option("#approximation", "deepcache")
    page.click("#generate")

    page.wait_for_function("document.getElementById('result-image').naturalWidth === 256", timeout=120_000)
    seed = page.get_attribute("#result-image", "data-seed")
    assert seed is not None and seed.isdigit()
    assert page.inner_text("#status").startswith("Done in") and f"seed {seed}" in page.inner_text("#status")
    assert page.is_enabled("#generate") and page.is_disabled("#cancel")
    assert submits[0].headers["authorization"] == "Bearer sk-sdxl-test"
    body = submits[0].post_data_json
    assert body == {"prompt": "a lighthouse at dusk", "negative_prompt": "fog", "width": 256, "height": 256,
                    "steps": 4, "refine": "none", "approximation": "deepcache"}

    items = page.locator("#gallery-list .gallery-item")
    assert items.count() == 1 and items.first.get_attribute("data-seed") == seed
    assert "a lighthouse at dusk" in items.first.inner_text() and f"seed {seed}" in items.first.inner_text()
    assert "approximate (deepcache)" in items.first.inner_text()
    href = page.get_attribute("#download", "href")
    image = httpx.get(href, timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)

    page.click("#reuse-seed")
    assert page.input_value("#seed") == seed
    page.reload()  # the gallery and the key live in localStorage
    page.wait_for_function("document.querySelector('#gallery-list img')?.naturalWidth === 256", timeout=30_000)
    assert page.locator("#gallery-list .gallery-item").count() == 1
    assert page.input_value("#api-key") == "sk-sdxl-test"
    assert page.errors == []


def test_cancel_stops_the_generation(server, page):
    page.goto(f"{server.url}/ui/")
    page.fill("#prompt", "a slow one")
    page.select_option("#size", "512x512")
    page.fill("#steps", "100")
    page.click("#generate")
    page.wait_for_function("/^Step [1-9]/.test(document.getElementById('status').textContent)", timeout=60_000)
    # the event stream's previews show while it denoises (a JPEG from the latents every few steps)
    page.wait_for_function("!document.getElementById('preview').hidden && "
                           "document.getElementById('preview').naturalWidth > 0", timeout=60_000)
    assert int(page.get_attribute("#preview", "data-step")) >= 1
    assert page.is_enabled("#cancel")
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status').textContent === 'Cancelled.'", timeout=30_000)
    assert page.is_enabled("#generate") and page.locator("#result").is_hidden()
    assert page.errors == []


def test_errors_are_shown(server, page):
    page.goto(f"{server.url}/ui/")
    page.click("#generate")
    assert page.inner_text("#error") == "Write a prompt first."
    page.evaluate("document.getElementById('prompt').removeAttribute('maxlength')")  # the server's limit answers
    page.fill("#prompt", "x" * 600)
    page.select_option("#size", "256x256")
    page.fill("#steps", "4")
    page.click("#generate")
    page.wait_for_function("!document.getElementById('error').hidden", timeout=60_000)
    assert "the limit is 500" in page.inner_text("#error")
    assert page.is_enabled("#generate")
