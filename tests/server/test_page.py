"""The web page in a real browser: headless Chromium (Debian's, through Playwright) on a live
server over the shapes model. Typing a prompt and generating shows progress and then the
picture with its settings, which a click puts back in the form; the mask painted on an
uploaded picture travels with the job; a phone-sized screen has no sideways scroll; the
page loads nothing from outside the server. The browser tests are skipped only where
chromium is missing (apt-get install chromium)."""

from __future__ import annotations

import base64
import io
import re
import shutil
from importlib.resources import files

import httpx
import pytest
from PIL import Image
from server.live import events, running_server

PAGE_DIR = files("latentkit.server") / "page"
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="the page tests need Debian's chromium: apt-get install chromium"
)
PHONE = {"width": 375, "height": 667}


# ---------------------------------------------------------------- without a browser


def test_the_page_files_name_no_outside_urls():
    for name in ("index.html", "app.js", "style.css"):
        text = (PAGE_DIR / name).read_text(encoding="utf-8")
        assert not re.search(r"https?://", text), f"{name} names an outside URL"


def test_the_page_is_served_and_nothing_else_by_its_routes(server):
    client, _ = server
    index = client.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert "/page/app.js" in index.text
    assert "default-src 'self'" in index.headers["content-security-policy"]
    assert client.get("/page/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/page/style.css").headers["content-type"].startswith("text/css")
    for name in ("page.py", "..%2Fapp.py", "%2E%2E%2F%2E%2E%2Fconfig.py", "index.htm", ""):
        answer = client.get(f"/page/{name}")
        assert answer.status_code == 404, name
        assert b"import" not in answer.content


# ---------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def live(shapes_models, tmp_path_factory):
    """(base URL, queue) of one server shared by this module's browser tests."""
    with running_server(shapes_models, tmp_path_factory.mktemp("page-out")) as found:
        yield found


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("the page tests need Debian's chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_page(browser, url, viewport=None):
    """A fresh page on ``url``, set up; it records every request and every script error."""
    context = browser.new_context(viewport=viewport or {"width": 1280, "height": 900})
    page = context.new_page()
    page.requests, page.errors = [], []
    page.on("request", lambda request: page.requests.append(request.url))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(url)
    page.wait_for_selector("body[data-ready]")
    return page


@pytest.fixture
def page(browser, live):
    url, _ = live
    page = open_page(browser, url)
    yield page
    assert page.errors == []
    page.context.close()


def watch_progress(page):
    """Record every value the progress bar takes, with whether the gallery grew yet."""
    page.evaluate(
        """() => {
        window.seen = [];
        const bar = document.getElementById("progress");
        const count = () => document.querySelectorAll("#gallery li").length;
        const before = count();
        new MutationObserver(() => window.seen.push([bar.value, bar.max, count() > before]))
          .observe(bar, {attributes: true});
    }"""
    )


def card(page, text):
    return page.locator("#gallery li", has_text=text).first


def wait_for_card(page, text):
    """The gallery's picture whose caption has ``text``, failing at once on an API error."""
    found = card(page, text)
    found.or_(page.locator("#message:not([hidden])")).first.wait_for(timeout=120_000)
    assert page.is_hidden("#message"), page.inner_text("#message")
    return found


def set_range(page, selector, value):
    page.locator(selector).evaluate(
        "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', {bubbles: true})); }",
        value,
    )


def set_seed_and_steps(page, seed, steps):
    page.fill("#seed", str(seed))
    page.fill("#steps", str(steps))


@needs_chromium
def test_generate_shows_progress_then_the_picture_whose_click_reuses_its_settings(page, live):
    _, queue = live
    page.fill("#prompt", "a red circle above a blue square")
    set_seed_and_steps(page, 11, 4)
    page.fill("#cfg", "3")
    watch_progress(page)
    page.click("#generate")
    item = wait_for_card(page, "a red circle above a blue square")
    seen = page.evaluate("window.seen")
    assert any(0 < value < top and not grown for value, top, grown in seen), seen
    assert "seed 11" in item.inner_text() and "4 steps" in item.inner_text()
    assert item.locator("img").evaluate("img => img.naturalWidth") == 64
    assert "Done" in page.inner_text("#progress-text")

    page.fill("#prompt", "something else")
    set_seed_and_steps(page, 99, 2)
    item.click()
    assert page.input_value("#prompt") == "a red circle above a blue square"
    assert (page.input_value("#seed"), page.input_value("#steps")) == ("11", "4")
    assert float(page.input_value("#cfg")) == 3.0
    assert page.input_value("#sampler") == queue.recent()[0]["options"]["sampler"]


@needs_chromium
def test_ctrl_enter_generates_and_a_reload_lists_the_done_jobs(page, live):
    url, _ = live
    page.fill("#prompt", "a green triangle")
    set_seed_and_steps(page, 5, 2)
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    wait_for_card(page, "a green triangle")
    again = open_page(page.context.browser, url)
    try:
        assert card(again, "a green triangle").is_visible()
        first = again.locator("#gallery li").first.inner_text()
        assert "a green triangle" in first  # newest first
    finally:
        again.context.close()


@needs_chromium
def test_cancel_stops_the_running_job(page, live):
    _, queue = live
    page.fill("#prompt", "a long one")
    page.fill("#steps", "500")
    page.click("#generate")
    page.locator("#progress-text", has_text=re.compile(r"step [1-9]")).wait_for(timeout=120_000)
    assert page.is_disabled("#generate")
    page.click("#cancel")
    page.wait_for_selector("#progress-text:has-text('Cancelled')")
    assert page.is_enabled("#generate") and page.is_disabled("#cancel")
    assert queue.recent()[0]["state"] == "cancelled"
    assert page.locator("#gallery li", has_text="a long one").count() == 0


def png_file(path, color=(200, 40, 40)):
    Image.new("RGB", (64, 64), color).save(path)
    return path


def decode_data_url(url):
    head, data = url.split(",", 1)
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


@needs_chromium
def test_a_painted_mask_goes_with_the_job_and_changes_the_picture(page, live, tmp_path):
    url, queue = live
    sent = []
    page.on(
        "request",
        lambda r: sent.append(r.post_data_json) if r.method == "POST" and r.url.endswith(
            "/api/v1/jobs"
        ) else None,
    )  # fmt: skip
    page.click("#img2img summary")
    page.set_input_files("#init-file", str(png_file(tmp_path / "init.png")))
    canvas = page.locator("#mask")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    # a stroke across the middle of the picture, left to right
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, y, steps=8)
    page.mouse.up()
    set_range(page, "#strength", 0.8)
    page.fill("#prompt", "a blue square")
    set_seed_and_steps(page, 21, 3)
    page.click("#generate")
    wait_for_card(page, "strength 0.8")

    (body,) = sent
    assert body["strength"] == 0.8 and body["seed"] == 21
    init = decode_data_url(body["init_image"])
    mask = decode_data_url(body["mask"]).convert("L")
    assert init.size == mask.size == (64, 64)
    assert mask.getpixel((32, 32)) == 255 and mask.getpixel((16, 32)) == 255  # on the stroke
    assert mask.getpixel((32, 4)) == 0 and mask.getpixel((2, 60)) == 0  # far from it

    with httpx.Client(base_url=url, timeout=60) as client:
        job = client.get("/api/v1/jobs").json()["jobs"][0]
        assert job["options"]["strength"] == 0.8 and job["state"] == "done"
        painted = client.get(f"/api/v1/jobs/{job['id']}/images/{job['images'][0]}").content
        plain_id = client.post(
            "/api/v1/jobs", json={"prompt": "a blue square", "seed": 21, "steps": 3}
        ).json()["id"]
        (_, done), *_ = reversed(events(client, plain_id))
        text_only = client.get(done["image_urls"][0]).content
    assert pixels(painted) != pixels(text_only)


def pixels(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


@needs_chromium
def test_a_phone_screen_has_one_column_and_no_sideways_scroll(browser, live, tmp_path):
    url, _ = live
    page = open_page(browser, url, PHONE)
    try:
        page.click("#img2img summary")
        page.set_input_files("#init-file", str(png_file(tmp_path / "init.png")))
        page.locator("#mask").wait_for()
        assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
        generate = page.locator("#generate")
        generate.scroll_into_view_if_needed()
        assert generate.is_visible() and generate.is_enabled()
        generate.click(trial=True)  # nothing covers it
        for control in page.locator("input, select, textarea").all():
            if control.is_visible():
                assert control.evaluate(
                    "el => Boolean(el.labels && el.labels.length) || el.hasAttribute('aria-label')"
                ), control.evaluate("el => el.outerHTML")
        settings, gallery = (page.locator(s).bounding_box() for s in ("#settings", ".output"))
        assert gallery["y"] >= settings["y"] + settings["height"]  # one column
    finally:
        page.context.close()


@needs_chromium
def test_the_page_loads_nothing_from_outside_and_shows_api_errors(page, live):
    url, _ = live
    page.fill("#prompt", "x")
    page.fill("#steps", "100000")
    page.click("#generate")
    message = page.locator("#message")
    message.wait_for()
    assert "steps must be at most" in message.inner_text()
    assert page.is_enabled("#generate")
    assert page.requests
    for request in page.requests:
        assert request.startswith((url + "/", "data:", "blob:")), request


@needs_chromium
def test_with_a_token_the_page_asks_for_it_once_and_sends_it(browser, shapes_models, tmp_path):
    with running_server(shapes_models, tmp_path / "out", token="s3cret") as (url, _):
        context = browser.new_context()
        try:
            page = context.new_page()
            page.goto(url)
            page.locator("#token").fill("wrong")
            page.click("#token-form button")
            page.wait_for_selector("#token-note:has-text('refused')")
            page.locator("#token").fill("s3cret")
            page.click("#token-form button")
            page.wait_for_selector("body[data-ready]")
            assert page.is_hidden("#token-form") and page.is_hidden("#message")
            assert page.input_value("#model") == "shapes"
            page.reload()
            page.wait_for_selector("body[data-ready]")  # kept for the tab: not asked again
            assert page.is_hidden("#token-form") and page.input_value("#model") == "shapes"
        finally:
            context.close()


@needs_chromium
def test_explain_shows_attention_per_token_and_the_steps_of_a_picture(page, live):
    url, queue = live
    page.fill("#prompt", "a blue star in the bottom right corner")
    set_seed_and_steps(page, 21, 6)
    page.click("#generate")
    item = wait_for_card(page, "a blue star in the bottom right corner")
    item.locator(".explain-button").click()
    figures = page.locator("#explain-figures img")
    figures.nth(1).or_(page.locator("#message:not([hidden])")).first.wait_for(timeout=120_000)
    assert page.is_hidden("#message"), page.inner_text("#message")
    widths = [figures.nth(i).evaluate("img => img.naturalWidth") for i in range(2)]
    assert all(width > 128 for width in widths), widths  # figures, wider than the picture
    status = page.inner_text("#explain-status")
    assert "Seed 21" in status and "star" in status
    (explained,) = [j for j in queue.recent() if j["kind"] == "explain"]
    assert explained["options"]["prompt"] == "a blue star in the bottom right corner"
    again = open_page(page.context.browser, url)  # the figures stay out of the gallery
    try:
        pictures = [
            name
            for job in queue.recent()
            if job["kind"] != "explain" and job["state"] == "done"
            for name in job["images"]
        ]
        assert again.locator("#gallery li").count() == len(pictures)
    finally:
        again.context.close()
    page.click("#explain-close")
    assert page.is_hidden("#explain")
