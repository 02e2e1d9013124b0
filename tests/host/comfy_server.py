"""A real ComfyUI server on 127.0.0.1 for the tests that talk to it over HTTP (tests/browser,
tests/host/test_load.py).

The server runs the ComfyUI host found by tests/conftest.py (`main.py --cpu`) on a free port, in
a temporary base directory holding this pack (linked into custom_nodes/) and, when given, the tiny
checkpoint; the host's own custom_nodes/ are not loaded. Nothing here imports ComfyUI.
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from harness.host import PACK_NAME, PACK_ROOT, host_on_path  # noqa: F401  (PACK_NAME, PACK_ROOT: re-exported)


def host_dir() -> Path:
    """The ComfyUI tree tests/conftest.py put on sys.path; it must have main.py (a server can start)."""
    host = host_on_path()
    if host is None or not (host / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI host with main.py on sys.path (found {host})")
    return host


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate a server process; kill it if it does not end within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fetch_json(url: str, timeout: float = 30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def prepare_server_dir(base: Path, checkpoint: Path | None) -> None:
    """ComfyUI's --base-directory: the pack under custom_nodes/, the checkpoint, input/ and output/."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(PACK_ROOT, target_is_directory=True)
    ckpts = base / "models" / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None and not (ckpts / checkpoint.name).exists():
        (ckpts / checkpoint.name).symlink_to(checkpoint)
    (base / "input").mkdir(exist_ok=True)
    (base / "output").mkdir(exist_ok=True)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (VmRSS in /proc; Linux only)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:  # exited meanwhile
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
    return total


class Server:
    """`python main.py --cpu` of the ComfyUI tree `host_dir` on a free local port; the log goes to
    base/comfyui.log. `env` adds to (or overrides) this process's environment."""

    def __init__(self, host_dir: Path, base: Path, python: str = sys.executable, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = base
        self.log_path = base / "comfyui.log"
        self._log = open(self.log_path, "wb")
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes", "--disable-auto-launch"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(cmd, cwd=str(host_dir), stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss(self) -> int:
        """The server's resident memory in bytes (its child processes included)."""
        return rss_bytes(self.proc.pid)

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

    def queue(self, prompt: dict, client_id: str = "sega-test") -> str:
        """POST /api/prompt; returns the prompt id (AssertionError with the server's answer if refused)."""
        status, body = self.post_json("/api/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200 and "prompt_id" in body, f"/api/prompt refused the prompt: {json.dumps(body)[:2000]}"
        return body["prompt_id"]

    def wait_history(self, prompt_id: str, timeout: float = 120) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            h = self.get_json(f"/api/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                entry = h[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s:\n{self.log()[-3000:]}")

    def images(self, entry: dict, node_id: str | None = None) -> list:
        """The images a history entry's output nodes wrote, fetched through /view (PIL images, in
        node-id then batch order; only `node_id`'s when given)."""
        from PIL import Image

        found = []
        outputs = entry["outputs"]
        for nid in sorted(outputs, key=lambda k: (len(k), k)):
            if node_id is not None and nid != node_id:
                continue
            for img in outputs[nid].get("images", []):
                q = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img["subfolder"],
                                            "type": img["type"]})
                status, ctype, body = self.get(f"/view?{q}")
                assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n", (status, ctype)
                im = Image.open(io.BytesIO(body))
                im.load()
                found.append(im)
        return found

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()
