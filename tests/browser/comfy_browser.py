"""A ComfyUI server and a headless Chromium page for the browser tests (and make_workflows.py).

The server is tests/host/comfy_server.py's: the ComfyUI host found by tests/conftest.py with --cpu
on 127.0.0.1 and a free port, in a temporary base directory holding this pack (linked into
custom_nodes/), the tiny checkpoint and, added here, the frontend's user settings. The browser
is the system's Chromium (Debian's `chromium` package) driven by Python playwright; no browser
is ever downloaded, and every page request that is not to the local server is aborted.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from comfy_server import PACK_NAME, PACK_ROOT, Server, prepare_server_dir  # noqa: F401  (re-exported)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The console errors of a stock page: the app's startup notice, and the frontend's index.html
# linking /user.css, which the frontend package does not ship (a 404 on every stock page).
STOCK_CONSOLE_ERRORS = ("ComfyApp graph accessed before initialization",)


def is_stock_console_error(text: str, server_url: str) -> bool:
    if any(s in text for s in STOCK_CONSOLE_ERRORS):
        return True
    # the frontend's own code reaching for the internet (seen: a model download link of its templates,
    # now and then while a page loads): the page allows only the local server, so the browser refuses
    # the connection and logs it. Not when the code is an extension's (served under /extensions/).
    target = re.search(r"https?://[^\s'\"\]]+", text)
    if ("Content Security Policy" in text and target and not target.group().startswith(server_url)
            and "/extensions/" not in text):
        return True
    return "status of 404" in text and text.endswith(f"[{server_url}/user.css]")


def console_errors(console: list, server_url: str, since: int = 0) -> list:
    """The page's errors logged since entry `since` of `console`, less those of a stock page."""
    return [(t, text) for t, text in console[since:]
            if t in ("error", "pageerror") and not is_stock_console_error(text, server_url)]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def why_no_browser() -> str | None:
    """None when the browser tests can run, else one line saying what is missing."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "python playwright is not installed (pip install -r requirements-dev.txt)"
    if chromium_path() is None:
        return "no system Chromium (Debian: apt-get install chromium)"
    return None


def prepare_base_dir(base: Path, checkpoint: Path | None) -> None:
    """The server's base directory (comfy_server.prepare_server_dir) with the user settings of a
    used install, so that the page shows no tutorial and logs no 404s that are not the pack's."""
    prepare_server_dir(base, checkpoint)
    user = base / "user" / "default"
    for folder in ("workflows", "subgraphs"):
        (user / folder).mkdir(parents=True, exist_ok=True)
    (user / "comfy.templates.json").write_text("[]")
    (user / "user.css").write_text("")
    # no tutorial dialog; screenshots: full detail when zoomed out, no minimap, no missing-model
    # dialog (the examples name real checkpoints; the tests run them on the tiny one)
    (user / "comfy.settings.json").write_text(json.dumps({
        "Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
        "Comfy.Workflow.ShowMissingModelsWarning": False,
        "LiteGraph.Canvas.MinFontSizeForLOD": 1, "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1}))


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)


def open_page(browser, server: Server, console: list | None = None, viewport=(1280, 800),
              failed: list | None = None):
    """A page on the server's frontend, ready (app and graph up), every outside request aborted."""
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    local = server.url + "/"

    def route(r):
        if r.request.url.startswith(local) or r.request.url == server.url:
            r.continue_()
        else:
            r.abort()

    page.route("**/*", route)
    if console is not None:
        page.on("console", lambda m: console.append((m.type, f"{m.text} [{m.location.get('url', '')}]")))
        page.on("pageerror", lambda e: console.append(("pageerror", str(e))))
    if failed is not None:
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(server.url + "/", wait_until="domcontentloaded")
    page.wait_for_function("() => !!(window.app?.extensionManager && window.app?.graph)", timeout=60000)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => r()))")
    return page


def node_screenshots(page, node_id: int, page_path: Path, node_path: Path):
    """Screenshots of the page (page_path) and of node `node_id` with its title and a margin of 8
    graph units (node_path). Returns `tile_pixels(tile)`: the grayscale pixels of the page's
    screenshot inside a preview tile (x, y, w, h in the node's units, as maskPreview reports them)."""
    from PIL import Image

    box = page.evaluate("""(id) => { const n = app.graph.getNodeById(id); const ds = app.canvas.ds;
        const r = app.canvas.canvas.getBoundingClientRect(); const t = LiteGraph.NODE_TITLE_HEIGHT;
        return {left: r.left, top: r.top, scale: ds.scale, ox: ds.offset[0], oy: ds.offset[1],
                x: n.pos[0], y: n.pos[1], w: n.size[0], h: n.size[1], title: t}; }""", node_id)
    s = box["scale"]

    def to_screen(x, y):
        return box["left"] + (box["x"] + x + box["ox"]) * s, box["top"] + (box["y"] + y + box["oy"]) * s

    page.screenshot(path=str(page_path))
    left, top = to_screen(-8, -box["title"] - 8)
    right, bottom = to_screen(box["w"] + 8, box["h"] + 8)
    page.screenshot(path=str(node_path), clip={"x": left, "y": top, "width": right - left, "height": bottom - top})
    image = Image.open(page_path).convert("L")

    def tile_pixels(tile: dict) -> list:
        x0, y0 = to_screen(tile["x"] + 1.5, tile["y"] + 1.5)
        x1, y1 = to_screen(tile["x"] + tile["w"] - 1.5, tile["y"] + tile["h"] - 1.5)
        return list(image.crop((round(x0), round(y0), round(x1), round(y1))).tobytes())

    return tile_pixels
