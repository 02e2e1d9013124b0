"""SEGA Concept's mask_from in ComfyUI's frontend (the system's Chromium): one concept in each mode.

The run uses the tiny checkpoint whose UNet has cross-attention at a quarter of the latent
(harness.tiny's TINY_MASK_UNET; the one-level tiny model has no such layer, so attention and
intersect refuse it). The SEGA KSampler's live preview shows one tile per concept, the mask each
one actually used; the screenshot of the node is the README's docs/attention-masks-preview.png
(written to <artifacts>/readme/; copy it to docs/ in 256 colours).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfy_browser import PACK_NAME, console_errors, node_screenshots, open_page, why_no_browser
from harness.workflow import small_run

_missing = why_no_browser()
if _missing:
    pytest.skip(f"browser tests skipped: {_missing}", allow_module_level=True)

pytestmark = pytest.mark.host

EXAMPLE = Path(__file__).resolve().parents[2] / "workflows" / "04-several-concepts-stack.json"
PREVIEW_JS = f"/extensions/{PACK_NAME}/sega_mask_preview.js"
STEPS = 10
SIZE = 384  # a 48x48 latent: 12x12 attention maps
MODES = ("implicit", "attention", "intersect")
CONCEPTS = (7, 9, 11)  # the example's three SEGA Concepts, in the stack's order
TEXTS = (6, 8, 10)  # their CLIP Text Encodes
CONCEPT = "glasses"  # one concept three times: the masks differ by the mode only


@pytest.fixture(scope="module")
def page_and_console(comfy_server, browser):
    console = []
    page = open_page(browser, comfy_server, console, viewport=(1280, 1000))
    page.evaluate("() => app.graph.clear()")
    yield page, console
    page.close()


def test_mask_from_three_modes_preview(page_and_console, comfy_server, artifacts_dir):
    """One concept ("glasses") three times, mask_from implicit / attention / intersect, each labelled
    with its mode: the run succeeds, the preview shows an active tile for each at the last step, the
    attention tile differs from the implicit one, intersect keeps only positions of the attention
    mask and no more than either; screenshot of the node's preview."""
    page, console = page_and_console
    before = len(console)
    out = artifacts_dir / "readme"
    out.mkdir(exist_ok=True)
    wf = json.loads(EXAMPLE.read_text())
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", wf)
    page.evaluate("""([ids, texts, modes, concept, steps, size]) => {
        const set = (id, name, value) => { app.graph.getNodeById(id).widgets.find(w => w.name === name).value = value; };
        texts.forEach((id) => set(id, 'text', concept));
        set(13, 'steps', steps); set(5, 'width', size); set(5, 'height', size);
        ids.forEach((id, i) => {
            for (const [name, value] of [['mask_from', modes[i]], ['label', modes[i]], ['edit_scale', 5], ['direction', 'add'],
                                         ['threshold', 0.9], ['warmup', 0], ['cooldown', 10000], ['weight', 1]])
                set(id, name, value);
        });
    }""", [list(CONCEPTS), list(TEXTS), list(MODES), CONCEPT, STEPS, SIZE])
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert [prompt[str(i)]["inputs"]["mask_from"] for i in CONCEPTS] == list(MODES)
    assert prompt["13"]["inputs"]["steps"] == STEPS and prompt["5"]["inputs"]["width"] == SIZE
    prompt = small_run(prompt, comfy_server.mask_ckpt_name, STEPS, SIZE)
    assert prompt["2"]["inputs"]["ckpt_name"] == comfy_server.mask_ckpt_name
    client_id = page.evaluate("async () => (await import('/scripts/api.js')).api.clientId")
    status, body = comfy_server.post_json("/api/prompt", {"prompt": prompt, "client_id": client_id})
    assert status == 200, body
    entry = comfy_server.wait_history(body["prompt_id"])
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    assert comfy_server.images(entry)

    # the node alone at a readable zoom, clear of the page's side bar and menus; no toasts over it
    page.evaluate("""() => { const n = app.graph.getNodeById(13); const ds = app.canvas.ds; ds.scale = 1.4;
        ds.offset[0] = 300 / ds.scale - n.pos[0]; ds.offset[1] = 160 / ds.scale - n.pos[1];
        document.querySelectorAll('.p-toast-message').forEach(e => e.remove()); }""")
    preview = page.wait_for_function("""async (url) => {
        const { maskPreview } = await import(url);
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        const p = maskPreview(app.graph.getNodeById(13));
        return p && p.step === p.steps - 1 && p.tiles.length === 3 && p.tiles.every(t => t.shown) && p;
    }""", arg=PREVIEW_JS, timeout=30000).json_value()
    assert preview["steps"] == STEPS
    assert [t["label"] for t in preview["tiles"]] == list(MODES)
    assert all(t["active"] for t in preview["tiles"])
    shot = out / "attention-masks-preview.png"
    tile_pixels = node_screenshots(page, 13, artifacts_dir / "attention-masks-page.png", shot)
    print(f"attention masks preview: {shot}")

    def kept(tile):
        return [p >= 128 for p in tile_pixels(tile)]

    implicit, attention, intersect = (kept(t) for t in preview["tiles"])
    assert len(implicit) == len(attention) == len(intersect)
    n = len(implicit)
    share = [sum(m) / n for m in (implicit, attention, intersect)]
    assert 0.01 < share[0] < 0.6 and 0.01 < share[1] < 0.6, share  # each keeps some positions, not all
    differ = sum(a != b for a, b in zip(implicit, attention)) / n
    assert differ > 0.02, (differ, share)  # the attention mask is not SEGA's own
    # intersect keeps only positions of the attention mask (a few edge pixels of the scaled tiles aside)
    outside = sum(c and not a for c, a in zip(intersect, attention)) / n
    assert outside < 0.01, (outside, share)
    assert share[2] <= min(share[0], share[1]) + 0.01, share
    assert not console_errors(console, comfy_server.url, before)
