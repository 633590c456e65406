"""The README's picture of the web page: serve the shipped shapes model on a free loopback
port, make a few pictures through the page in headless Chromium, save a screenshot.

    python scripts/screenshot_page.py                # -> docs/images/serve-page.png
    python scripts/screenshot_page.py --out page.png --steps 10

Needs the serve and test extras (FastAPI, uvicorn, Playwright) and Debian's chromium
(apt-get install chromium); Playwright's own browsers are not used.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from PIL import Image
from playwright.sync_api import sync_playwright

from latentkit.server.app import create_app
from latentkit.server.jobs import JobQueue
from latentkit.weights import load
from latentkit.weights.shipped import DEFAULT_MODEL

PROMPTS = [  # oldest first: the gallery shows the newest first
    ("a yellow star left of a purple hexagon", 4),
    ("a green triangle below a red circle", 8),
    ("a white square right of an orange star", 2),
    ("a red circle above a blue square", 3),
]
VIEWPORT = {"width": 1200, "height": 760}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(outputs: Path) -> tuple[str, uvicorn.Server, JobQueue]:
    """A server on the shapes model in a thread: (base URL, server, queue)."""
    queue = JobQueue({DEFAULT_MODEL: load(DEFAULT_MODEL)}, outputs, 8)
    queue.start()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(queue), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, queue


def make_pictures(page, steps: int) -> None:
    """Generate each prompt through the form, waiting for its picture in the gallery."""
    for prompt, seed in PROMPTS:
        page.fill("#prompt", prompt)
        page.fill("#steps", str(steps))
        page.fill("#seed", str(seed))
        page.click("#generate")
        page.locator("#gallery li", has_text=prompt).first.wait_for(timeout=300_000)
    page.locator("#prompt").blur()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images/serve-page.png"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("needs Debian's chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory() as outputs:
        url, server, queue = serve(Path(outputs))
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=chromium, args=["--no-sandbox"]
                )
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(url)
                page.wait_for_selector("body[data-ready]")
                make_pictures(page, args.steps)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            server.should_exit = True
            queue.close()
    # a palette PNG: a dark page of flat colours keeps well under the README's size budget
    Image.open(args.out).convert("RGB").quantize(256).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
