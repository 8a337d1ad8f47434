"""`opendit app` in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright types a prompt,
clicks Generate, watches the per-step progress, and plays the video. Skips without playwright or a browser.

    OPENDIT_UPDATE_SCREENSHOT=1 pytest tests/test_app_browser.py     # also rewrites docs/app.png (the README's)
"""

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the [app] extra (gradio) is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from app_server import start_app  # noqa: E402

pytestmark = pytest.mark.browser

PROMPT = "a red circle moving to the right on a black background"
EXAMPLE = "a blue square moving up on a black background"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "app.png"
# Collects every progress text the page shows ("12/50 steps | 1.0s"), however briefly.
WATCH_PROGRESS = """() => {
    window.progressTexts = [];
    new MutationObserver(() => {
        for (const el of document.querySelectorAll('.progress-text, .meta-text, .progress-level'))
            window.progressTexts.push(el.textContent);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""
VIDEO_PLAYING = """() => {
    const v = document.querySelector('.opendit-video video');
    return v !== null && v.duration > 0 && v.currentTime > 0 && !v.paused;
}"""


def chromium_executable() -> str | None:
    """The system browser (Playwright's own download is not used): $OPENDIT_CHROMIUM, else chromium on PATH."""
    candidates = [os.environ.get("OPENDIT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"]
    return next((shutil.which(c) for c in candidates if c and shutil.which(c)), None)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    url, _, page = start_app(tmp_path_factory.mktemp("app_browser_out"))
    yield url
    page.close()


@pytest.fixture(scope="module")
def browser():
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no chromium executable (apt-get install -y chromium, or set OPENDIT_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable,
                                             args=["--autoplay-policy=no-user-gesture-required"])
        yield browser
        browser.close()


def test_page_generates_playing_videos_with_progress_shows_errors_and_recalls_settings(browser, url, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    page.get_by_label("Prompt").fill(PROMPT)
    assert page.title() == "OpenDiT"
    page.get_by_label("Seed").fill("0")
    page.evaluate(WATCH_PROGRESS)
    page.get_by_role("button", name="Generate").click()

    page.wait_for_function(VIDEO_PLAYING, timeout=120_000)
    assert page.evaluate("document.querySelector('.opendit-video video').duration") == pytest.approx(1.0, abs=0.1)
    steps = [t for t in page.evaluate("window.progressTexts") if "/50 steps" in t]
    assert steps, "no per-step progress was shown"
    gallery = page.locator(".opendit-gallery img")
    gallery.first.wait_for()
    assert gallery.count() == 1
    text = "".join(page.evaluate("document.body.innerText").split())  # the settings beside the video
    assert '"seed":0,' in text and '"num_inference_steps":50,' in text

    # an example prompt fills the box; a second result joins the gallery
    page.get_by_text(EXAMPLE, exact=True).click()
    page.wait_for_function(f"() => document.querySelector('textarea').value === {EXAMPLE!r}", timeout=30_000)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => document.querySelectorAll('.opendit-gallery img').length === 2", timeout=120_000)
    page.wait_for_function(VIDEO_PLAYING, timeout=30_000)
    page.wait_for_timeout(500)  # a few frames in, for the screenshot
    shot = SCREENSHOT if os.environ.get("OPENDIT_UPDATE_SCREENSHOT") == "1" else tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # a bad input: a readable message in the page, nothing generated
    page.get_by_label("Prompt").fill("")
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("the prompt is empty").first.wait_for(timeout=30_000)
    assert gallery.count() == 2

    # clicking a result puts its settings back in the form
    gallery.nth(1).click()  # the first one (newest first)
    page.wait_for_function(f"() => document.querySelector('textarea').value === {PROMPT!r}", timeout=30_000)
    assert page.get_by_label("Seed").input_value() == "0"
