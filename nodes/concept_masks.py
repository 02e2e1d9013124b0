"""Where each concept acts: the latent positions its threshold keeps, step by step.

Two consumers; a sampling run with neither computes nothing extra:
- a preview pushed to the page while sampling (event "sega.masks", drawn by
  js/sega_mask_preview.js on the SEGA node that made the patch), only when this process is
  ComfyUI's server and the client that queued the prompt is connected; throttled, and always
  the run's last step;
- SEGA KSampler's concept_masks output: per concept and image, the fraction of the concept's
  active steps in which each position was kept (a few small tensor operations per step, on the
  device, read back once after sampling).

A position's value is the fraction of latent channels (and frames) whose entry the threshold
keeps, inside the concept's own mask (SEGA Concept's mask input) and area, over the steps in
which the concept edits the image (warmed up, not cooled down, in its timestep range).
"""
from __future__ import annotations

import base64
import io
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

EVENT = "sega.masks"
INTERVAL = 0.25  # seconds between two previews of one run (the last step is always sent)
PREVIEW_SIDE = 128  # a larger latent is shrunk (area average) to fit this, to keep messages small


@dataclass(frozen=True)
class PreviewTarget:
    """The SEGA node a preview is drawn on: its id in the prompt and the id the page knows."""

    node: str
    display_node: str


def preview_target(hidden) -> Optional[PreviewTarget]:
    """The executing SEGA node, from its hidden inputs (unique_id, dynprompt); None outside a prompt."""
    node = getattr(hidden, "unique_id", None) if hidden is not None else None
    if node is None:
        return None
    display = node
    dynprompt = getattr(hidden, "dynprompt", None)
    if dynprompt is not None and hasattr(dynprompt, "get_display_node_id"):
        display = dynprompt.get_display_node_id(node)
    return PreviewTarget(str(node), str(display))


def connected_server():
    """ComfyUI's PromptServer when this process is the server and the prompt's client is connected.

    Looks the server module up without importing it: a process that is not ComfyUI's server
    (a script, an in-process test) never sends anything."""
    module = sys.modules.get("server")
    server = getattr(getattr(module, "PromptServer", None), "instance", None)
    client = getattr(server, "client_id", None)
    if client is None or client not in (getattr(server, "sockets", None) or {}):
        return None
    return server


class MaskWatch:
    """One sampling run's use of the kept positions: the preview and/or the tally."""

    def __init__(self, labels: list, target: Optional[PreviewTarget], tally: bool):
        self.labels = labels
        self.target = target
        self.last_sent = None  # monotonic time of the last preview
        self.sent_step = None
        self.sums = [None] * len(labels) if tally else None  # (B, H, W) per concept
        self.counts = [0] * len(labels)

    @classmethod
    def for_run(cls, labels: list, target: Optional[PreviewTarget], tally: bool) -> Optional["MaskWatch"]:
        if target is not None and connected_server() is None:
            target = None
        if target is None and not tally:
            return None
        return cls(labels, target, tally)

    def wants(self, local: int, steps: int, first_call: bool) -> bool:
        """Whether this evaluation's kept positions are needed (decided without reading the device)."""
        if not first_call:
            return False
        return self.sums is not None or self._preview_due(local, steps)

    def _preview_due(self, local: int, steps: int) -> bool:
        if self.target is None or local == self.sent_step:
            return False
        return local >= steps - 1 or self.last_sent is None or time.monotonic() - self.last_sent >= INTERVAL

    def add(self, local: int, steps: int, rows: list, active: list, kept: Optional[torch.Tensor],
            weights: list) -> None:
        """One step's kept entries (len(rows), B, C, ...) of the concepts `rows`; `active[c]`: concept c
        edits the image this step; `weights[k]`: None or a (B or 1, H, W) weight for row k (its mask)."""
        where = {}
        live = [k for k, c in enumerate(rows) if active[c]]
        if kept is not None and live:
            # (len(rows), B, H, W): the fraction of channels (and frames) kept, for all rows in one
            # reduction, counted from the bool mask without a float copy of it
            kept = kept.flatten(2, -3)
            frac = kept.sum(2, dtype=torch.float32).div_(kept.shape[2])
            for k in live:
                where[rows[k]] = frac[k] if weights[k] is None else frac[k] * weights[k]
        if self.sums is not None:
            for c, m in where.items():
                self.sums[c] = m.clone() if self.sums[c] is None else self.sums[c].add_(m)
                self.counts[c] += 1
        if self._preview_due(local, steps):
            self._send(local, steps, where)

    def _send(self, local: int, steps: int, where: dict) -> None:
        server = connected_server()
        self.last_sent, self.sent_step = time.monotonic(), local
        if server is None:
            return
        masks = []
        for c, label in enumerate(self.labels):
            entry = {"label": label, "active": c in where}
            if c in where:
                entry["png"] = _png(where[c][0])
            masks.append(entry)
        server.send_sync(EVENT, {"node": self.target.node, "display_node": self.target.display_node,
                                 "step": local, "steps": steps, "masks": masks}, server.client_id)

    def result(self, batch: int, size: tuple) -> torch.Tensor:
        """The MASK (concepts x batch, H, W) at image size `size`: per concept, then per image, the
        fraction of its active steps in which each position was kept (0 where it never acted)."""
        latent = next((s.shape[-2:] for s in self.sums if s is not None), None)
        out = []
        for s, n in zip(self.sums, self.counts):
            if s is None:
                out.append(torch.zeros(batch, *size))
                continue
            m = (s / n).float().cpu().expand(batch, *latent)
            out.append(torch.nn.functional.interpolate(m.unsqueeze(1), size=size, mode="nearest").squeeze(1))
        return torch.cat(out).clamp(0.0, 1.0)


def _png(mask: torch.Tensor) -> str:
    """A (H, W) mask in [0, 1] as a base64 grayscale PNG, shrunk to PREVIEW_SIDE at most."""
    from PIL import Image

    m = mask.detach().float()
    if max(m.shape) > PREVIEW_SIDE:
        scale = PREVIEW_SIDE / max(m.shape)
        size = (max(1, round(m.shape[0] * scale)), max(1, round(m.shape[1] * scale)))
        m = torch.nn.functional.interpolate(m.view(1, 1, *m.shape), size=size, mode="area")[0, 0]
    pixels = (m.clamp(0.0, 1.0) * 255).round().to(torch.uint8).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
