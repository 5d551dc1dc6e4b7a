"""report.html in a real browser: Debian's Chromium driven headless by Playwright.

CI installs both (.ci/run); on a machine without them the test is skipped, except under CI
(CI=true), where a missing browser is a failure rather than a silent skip.
"""

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import METHODS

CHROMIUM = os.environ.get("BENCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Chromium as root in a container, with nothing reaching for the network on its own.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = [what for what, ok in (("playwright", sync_playwright is not None),
                                     (CHROMIUM, Path(CHROMIUM).is_file())) if not ok]
    if missing:
        message = f"the browser test needs {' and '.join(missing)} (bash .ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


def test_report_page_loads_in_headless_chromium(tmp_path, report_of_two_runs):
    sync_playwright = _browser_or_skip()
    _, report = report_of_two_runs
    novel = next(g for g in report.groups if g.key == ("tiny-suite", "digits", "tiny-digits", "novel"))
    shot = tmp_path / "report.png"
    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(report.html.resolve().as_uri(), wait_until="load")
        rows = page.eval_on_selector_all(f"#methods-{novel.slug} tbody tr th", "ths => ths.map(t => t.textContent)")
        images = {}
        for selector in ("#cd-diagram", f"#acc-vs-shots-{novel.slug}"):
            el = page.locator(selector)
            box = el.bounding_box()
            natural = el.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
            images[selector] = (el.is_visible(), box, natural)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert errors == []
    assert rows == list(METHODS)
    for selector, (visible, box, (complete, width, height)) in images.items():
        assert visible and complete and width > 100 and height > 50, selector
        assert box["width"] > 100 and box["height"] > 50, selector
    # nothing but the page itself and its embedded figures: it opens from disk with no network
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert shot.stat().st_size > 20_000
    if os.environ.get("BENCH_KEEP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["BENCH_KEEP_SCREENSHOT"])
