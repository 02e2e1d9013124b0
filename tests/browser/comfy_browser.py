"""A ComfyUI server and a headless Chromium page for the browser tests (and make_workflows.py).

The server runs the ComfyUI host found by tests/conftest.py with --cpu on 127.0.0.1 and a free
port, in a temporary base directory holding this pack (linked into custom_nodes/) and the tiny
checkpoint. The browser is the system's Chromium (Debian's `chromium` package) driven by Python
playwright; no browser is ever downloaded, and every page request that is not to the local
server is aborted.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "comfyui-sega"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The console errors of a stock page: the app's startup notice, and the frontend's index.html
# linking /user.css, which the frontend package does not ship (a 404 on every stock page).
STOCK_CONSOLE_ERRORS = ("ComfyApp graph accessed before initialization",)


def is_stock_console_error(text: str, server_url: str) -> bool:
    if any(s in text for s in STOCK_CONSOLE_ERRORS):
        return True
    return "status of 404" in text and text.endswith(f"[{server_url}/user.css]")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_dir(base: Path, checkpoint: Path | None) -> None:
    """ComfyUI's --base-directory: the pack, the checkpoint, settings that skip the tutorial."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(PACK_ROOT, target_is_directory=True)
    ckpts = base / "models" / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None and not (ckpts / checkpoint.name).exists():
        (ckpts / checkpoint.name).symlink_to(checkpoint)
    user = base / "user" / "default"
    # what a used install has; without them the page logs 404s that are not the pack's
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
    (base / "input").mkdir(exist_ok=True)
    (base / "output").mkdir(exist_ok=True)


class Server:
    def __init__(self, host_dir: Path, base: Path, python: str = sys.executable):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = base
        self.log_path = base / "comfyui.log"
        self._log = open(self.log_path, "wb")
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes", "--disable-auto-launch"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=str(host_dir), stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/api/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
            return r.status, r.headers.get("Content-Type", ""), body

    def get_json(self, path: str):
        return json.loads(self.get(path)[2])

    def post_json(self, path: str, data) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait_history(self, prompt_id: str, timeout: float = 120) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            h = self.get_json(f"/api/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                entry = h[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


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
