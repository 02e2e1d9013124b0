"""The example workflows in a real browser: ComfyUI's frontend in the system's Chromium.

One ComfyUI server (--cpu, tiny random-weight SD1.5 checkpoint) and one page for the module.
Each example in workflows/ is loaded with app.loadGraphData, converted with app.graphToPrompt,
then queued with the checkpoint pointed at the tiny model, 3 steps and 64x64 images (changed
in the API prompt only, never in the files), and must finish with images that /view serves.
The SDXL example runs on the tiny SD1.5 checkpoint: its graph has the same shape.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from comfy_browser import PACK_NAME, console_errors, node_screenshots, open_page, why_no_browser
from harness.workflow import small_run, ui_to_api

_missing = why_no_browser()
if _missing:
    pytest.skip(f"browser tests skipped: {_missing}", allow_module_level=True)

pytestmark = pytest.mark.host

WORKFLOWS_DIR = Path(__file__).resolve().parents[2] / "workflows"
WORKFLOWS = sorted(WORKFLOWS_DIR.glob("*.json"))
STEPS = 3
SIZE = 64
SEGA_NODES = {"SEGAConcept", "SEGAConceptStack", "SEGAApply", "SEGAGuider", "SEGAKSampler", "SEGASaveEdit",
              "SEGAReplayEdit", "SEGAInvertPhoto", "SEGAPhotoEdit"}
PHOTO_EXAMPLES = ("10-photo-add-concept-sd15", "11-photo-remove-concept-sd15", "12-photo-edit-sdxl")


@pytest.fixture(scope="module")
def page_and_console(comfy_server, browser):
    console, bad_responses = [], []
    page = open_page(browser, comfy_server, console, viewport=(1600, 1000), failed=bad_responses)
    # start from an empty graph: the default one would check its model online
    page.evaluate("() => app.graph.clear()")
    yield page, console, bad_responses
    page.close()


@pytest.fixture(scope="module")
def page(page_and_console):
    return page_and_console[0]


def load(page, wf: dict) -> dict:
    """Load a UI workflow; return {workflow, output} from graphToPrompt."""
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", wf)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    return page.evaluate("async () => { const p = await app.graphToPrompt(); "
                         "return {workflow: p.workflow, output: p.output}; }")


def small(prompt: dict, ckpt: str) -> dict:
    """The API prompt with the tiny checkpoint, few steps and 64x64 latents (test only)."""
    return small_run(prompt, ckpt, STEPS, SIZE)


def queue_and_wait(server, prompt: dict) -> dict:
    status, body = server.post_json("/api/prompt", {"prompt": prompt, "client_id": "sega-browser-test"})
    assert status == 200, f"/api/prompt refused the prompt: {json.dumps(body)[:2000]}"
    entry = server.wait_history(body["prompt_id"])
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    return entry


def images_of(server, entry: dict) -> list:
    return server.images(entry)


def screenshot(page, artifacts_dir: Path, name: str) -> None:
    try:
        page.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        # the "checkpoint is missing" toast: the examples name real checkpoints, the tests swap them
        page.evaluate("() => document.querySelectorAll('.p-toast-message').forEach(e => e.remove())")
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    except Exception:
        pass
    page.screenshot(path=str(artifacts_dir / f"{name}.png"))


def test_examples_exist_and_are_listed(comfy_server):
    names = {p.stem for p in WORKFLOWS}
    assert len(names) >= 10, names
    templates = comfy_server.get_json("/api/workflow_templates")
    listed = {n for pack in templates.values() for n in pack}
    assert names <= listed, (names - listed, templates)


def test_page_loads_without_console_errors(page_and_console, comfy_server):
    page, console, bad = page_and_console
    assert page.evaluate("() => !!LiteGraph.registered_node_types['SEGAConcept']")
    errors = console_errors(console, comfy_server.url)
    assert not errors, (errors, bad)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_loads_converts_and_runs(page_and_console, comfy_server, artifacts_dir, path):
    page, console, _ = page_and_console
    before = len(console)
    wf = json.loads(path.read_text())
    assert any(n["type"] == "Note" and n["widgets_values"][0].strip() for n in wf["nodes"]), "no Note"
    # the image Load Image names (ComfyUI's own input/example.png), small, in the server's input folder
    from PIL import Image
    for n in wf["nodes"]:
        if n["type"] == "LoadImage":
            Image.new("RGB", (SIZE, SIZE), (120, 90, 60)).save(comfy_server.base / "input" / n["widgets_values"][0])
    converted = load(page, wf)
    screenshot(page, artifacts_dir, path.stem)
    prompt = converted["output"]
    types = {n["class_type"] for n in prompt.values()}
    assert types & SEGA_NODES, types
    assert len(converted["workflow"]["nodes"]) == len(wf["nodes"])
    errors = console_errors(console, comfy_server.url, before)
    assert not errors, errors

    # run_sega.py's converter (the README's first command runs a shipped workflow with it) gives
    # the frontend's prompt
    object_info = comfy_server.get_json("/api/object_info")
    frontend = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in prompt.items()}
    assert ui_to_api(wf, lambda kind: object_info[kind]["input"] if kind in object_info else None) == frontend

    prompt = small(prompt, comfy_server.ckpt_name)
    if path.stem == "09b-replay-edit":
        # the file 09a-save-edit wrote (run first: sorted order); its name as the combo lists it
        saved = sorted((comfy_server.base / "output").rglob("*.safetensors"))
        assert saved, "09a-save-edit wrote no edit file"
        rel = saved[-1].relative_to(comfy_server.base / "output").as_posix()
        for n in prompt.values():
            if n["class_type"] == "SEGAReplayEdit":
                n["inputs"]["edit_file"] = f"{rel} [output]"
    t = time.monotonic()
    entry = queue_and_wait(comfy_server, prompt)
    images = images_of(comfy_server, entry)
    assert images, f"{path.stem}: no images"
    assert all(im.size[0] >= SIZE for im in images)
    if path.stem == "09b-replay-edit":
        assert len(images) == 4
    if path.stem in PHOTO_EXAMPLES:  # Load Image -> VAE Encode -> SEGA Invert Photo -> SEGA Photo Edit -> Save
        kinds = [n["class_type"] for n in prompt.values()]
        assert kinds.count("SEGAInvertPhoto") == 1 and kinds.count("SEGAPhotoEdit") == 1, kinds
        assert images[0].size == (SIZE, SIZE)  # the edit has the photo's size
    print(f"{path.stem}: ran in {time.monotonic() - t:.1f}s, {len(images)} images")


def test_concept_window_extension(page_and_console, comfy_server):
    """js/: the SEGA Concept nodes show their window; the prompt gets nothing from it."""
    page, console, _ = page_and_console
    try:
        comfy_server.get(f"/extensions/{PACK_NAME}/sega_concept_window.js")
    except OSError:
        pytest.skip("js/ is not served: the pack's __init__.py sets no WEB_DIRECTORY")
    assert "comfyui-sega.ConceptWindow" in page.evaluate("() => app.extensions.map(e => e.name)")
    before = len(console)
    wf = json.loads((WORKFLOWS_DIR / "04-several-concepts-stack.json").read_text())
    prompt = load(page, wf)["output"]
    page.evaluate("() => { app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true); }")
    concepts = [n for n in prompt.values() if n["class_type"] == "SEGAConcept"]
    spec = comfy_server.get_json("/api/object_info/SEGAConcept")["SEGAConcept"]["input"]
    inputs = {*spec["required"], *spec.get("optional", {})}  # the node's own inputs, nothing from js/
    assert concepts and all(set(n["inputs"]) <= inputs for n in concepts)
    assert not console_errors(console, comfy_server.url, before)


# A concept label that would run script or make elements if it were ever inserted as HTML.
HTML_LABEL = '<img src=x onerror=alert(1)><b>bold</b>'
PREVIEW_JS = f"/extensions/{PACK_NAME}/sega_mask_preview.js"


def test_mask_preview_draws_each_concept(page_and_console, comfy_server, artifacts_dir):
    """js/sega_mask_preview.js: while sampling, the SEGA KSampler node shows one tile per concept (the
    positions its threshold keeps), labelled with the concept's text as literal text; the tiles'
    pixels are checked in a screenshot; the prompt and the workflow get nothing from it."""
    page, console, _ = page_and_console
    try:
        comfy_server.get(PREVIEW_JS)
    except OSError:
        pytest.skip("js/ is not served: the pack's __init__.py sets no WEB_DIRECTORY")
    assert "comfyui-sega.MaskPreview" in page.evaluate("() => app.extensions.map(e => e.name)")
    before = len(console)
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    wf = json.loads((WORKFLOWS_DIR / "04-several-concepts-stack.json").read_text())
    load(page, wf)
    # concepts 7 (HTML label, threshold 0.9), 9 (cooled down at the last step), 11 (threshold 0: everywhere)
    page.evaluate("""(label) => {
        const set = (id, name, value) => { app.graph.getNodeById(id).widgets.find(w => w.name === name).value = value; };
        set(7, 'label', label); set(11, 'label', 'everywhere'); set(11, 'threshold', 0);
        set(5, 'width', 128); set(5, 'height', 96);
    }""", HTML_LABEL)
    converted = page.evaluate("async () => { const p = await app.graphToPrompt(); "
                              "return {workflow: p.workflow, output: p.output}; }")
    prompt = small(converted["output"], comfy_server.ckpt_name)
    assert prompt["7"]["inputs"]["label"] == HTML_LABEL
    prompt["5"]["inputs"].update(width=128, height=96)
    page.evaluate("""async (url) => {
        const { api } = await import('/scripts/api.js');
        window.__segaMaskEvents = [];
        api.addEventListener('sega.masks', (e) => window.__segaMaskEvents.push(
            {node: e.detail.node, step: e.detail.step, steps: e.detail.steps, masks: e.detail.masks.length}));
    }""", PREVIEW_JS)
    client_id = page.evaluate("async () => (await import('/scripts/api.js')).api.clientId")
    assert client_id
    status, body = comfy_server.post_json("/api/prompt", {"prompt": prompt, "client_id": client_id})
    assert status == 200, body
    entry = comfy_server.wait_history(body["prompt_id"])
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]

    page.wait_for_function(f"() => (window.__segaMaskEvents || []).some(e => e.step === {STEPS - 1})", timeout=30000)
    events = page.evaluate("() => window.__segaMaskEvents")
    assert all(e["node"] == "13" and e["steps"] == STEPS and e["masks"] == 3 for e in events), events
    assert events[0]["step"] == 0 and len(events) >= 2  # the first step, later ones, always the last
    # the node in view at a readable zoom, redrawn until the last step's pictures are shown
    page.evaluate("""() => { const n = app.graph.getNodeById(13); const ds = app.canvas.ds; ds.scale = 1.6;
        ds.offset[0] = 140 / ds.scale - n.pos[0]; ds.offset[1] = 110 / ds.scale - n.pos[1];
        document.querySelectorAll('.p-toast-message').forEach(e => e.remove()); }""")
    preview = page.wait_for_function("""async (url) => {
        const { maskPreview } = await import(url);
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        const p = maskPreview(app.graph.getNodeById(13));
        return p && p.step === p.steps - 1 && p.tiles.length === 3 && p.tiles[0].shown && p.tiles[2].shown && p;
    }""", arg=PREVIEW_JS, timeout=30000).json_value()
    assert [t["label"] for t in preview["tiles"]] == [HTML_LABEL, "glasses", "everywhere"]
    assert [t["active"] for t in preview["tiles"]] == [True, False, True]  # glasses cooled down at the last step
    shot, node_shot = artifacts_dir / "mask-preview.png", artifacts_dir / "mask-preview-node.png"
    tile_pixels = node_screenshots(page, 13, shot, node_shot)
    print(f"mask preview screenshots: {shot} and {node_shot}")

    kept, cooled, everywhere = (tile_pixels(t) for t in preview["tiles"])
    assert preview["tiles"][0]["w"] > preview["tiles"][0]["h"]  # 128x96: the latent's aspect
    assert max(kept) >= 120 and min(kept) <= 20, (min(kept), max(kept))  # kept and left-out positions
    assert 0.02 < sum(p >= 60 for p in kept) / len(kept) < 0.6
    assert min(everywhere) >= 250  # threshold 0 keeps every position
    assert max(cooled) < 160  # no picture: a dark tile saying "inactive"
    assert preview["tiles"][1]["h"] == preview["tiles"][0]["h"]

    # the label stayed text: no element made from it, no script run
    assert page.evaluate("() => document.querySelectorAll('img[src=\"x\"]').length") == 0
    assert page.evaluate("() => [...document.querySelectorAll('b')].filter(b => b.textContent === 'bold').length") == 0
    assert dialogs == []
    # nothing added to the prompt or the workflow
    after = page.evaluate("async () => { const p = await app.graphToPrompt(); "
                          "return {workflow: p.workflow, output: p.output}; }")
    assert after["output"]["13"]["inputs"] == converted["output"]["13"]["inputs"]
    node = next(n for n in after["workflow"]["nodes"] if n["id"] == 13)
    original = next(n for n in converted["workflow"]["nodes"] if n["id"] == 13)
    assert node["widgets_values"] == original["widgets_values"]
    assert set(node) == set(original)
    assert not console_errors(console, comfy_server.url, before)


def test_mask_preview_on_the_guider(page_and_console, comfy_server):
    """With SEGA Guider the sampling runs in SamplerCustomAdvanced; the preview goes to the guider."""
    page, console, _ = page_and_console
    before = len(console)
    wf = json.loads((WORKFLOWS_DIR / "06-guider-sampler-custom-advanced.json").read_text())
    prompt = small(load(page, wf)["output"], comfy_server.ckpt_name)
    assert prompt["8"]["class_type"] == "SEGAGuider"
    client_id = page.evaluate("async () => (await import('/scripts/api.js')).api.clientId")
    status, body = comfy_server.post_json("/api/prompt", {"prompt": prompt, "client_id": client_id})
    assert status == 200, body
    assert comfy_server.wait_history(body["prompt_id"])["status"]["status_str"] == "success"
    preview = page.wait_for_function("""async (url) => {
        const { maskPreview } = await import(url);
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        const p = maskPreview(app.graph.getNodeById(8));
        return p && p.step === p.steps - 1 && p.tiles.length === 1 && p.tiles[0].shown && p;
    }""", arg=PREVIEW_JS, timeout=30000).json_value()
    assert preview["steps"] == STEPS and preview["tiles"][0]["active"]
    assert page.evaluate("async (url) => (await import(url)).maskPreview(app.graph.getNodeById(12))",
                         PREVIEW_JS) is None  # not on SamplerCustomAdvanced
    assert not console_errors(console, comfy_server.url, before)


def install_example_checkpoint(comfy_server, wf: dict) -> str:
    """The checkpoint name the example's Load Checkpoint names, present on the server (the tiny model
    under that name), so the page shows no missing-model warning; returns the name."""
    name = next(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "CheckpointLoaderSimple")
    installed = comfy_server.base / "models" / "checkpoints" / name
    if not installed.exists():
        installed.symlink_to(comfy_server.base / "models" / "checkpoints" / comfy_server.ckpt_name)
    return name


def toasts(page) -> list:
    """The messages the page shows as toasts (a missing model, an error), less the schema warning an
    older frontend (v0.8.0's) gives for the fields a newer one saves in the examples: the README's
    pictures are taken on the main host's frontend, which saved them."""
    texts = page.evaluate("() => [...document.querySelectorAll('.p-toast-message')].map(t => t.innerText)")
    return [t for t in texts if "Invalid workflow against zod schema" not in t]


def test_readme_pictures(page_and_console, comfy_server, artifacts_dir):
    """The README's pictures (docs/*.png), as a user sees the product, written to
    <artifacts>/readme/ (to update the README, copy them to docs/ in 256 colours): the first example with its
    checkpoint installed (no missing-model warning), and the mask preview of the several-concepts
    example with its own labels, after a run."""
    page = page_and_console[0]
    out = artifacts_dir / "readme"
    out.mkdir(exist_ok=True)
    # the examples' checkpoint name, present on the server (the tiny model under that name)
    example = json.loads((WORKFLOWS_DIR / "01-add-concept-portrait-sd15.json").read_text())
    ckpt_name = install_example_checkpoint(comfy_server, example)
    page.set_viewport_size({"width": 1280, "height": 760})
    try:
        page.evaluate("""async () => { await app.refreshComboInNodes();
            await app.extensionManager.setting.set('Comfy.Graph.CanvasInfo', false); }""")
        load(page, example)
        page.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        page.wait_for_timeout(1500)  # a missing-model warning would have come by now
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        assert toasts(page) == []
        assert ckpt_name not in page.evaluate("() => document.body.innerText")  # no warning names it
        page.screenshot(path=str(out / "example-workflow.png"))

        wf = json.loads((WORKFLOWS_DIR / "04-several-concepts-stack.json").read_text())
        # as it stands (50 steps, the concepts' windows), on the tiny model under the example's name;
        # a 128x128 latent (not in the picture) keeps the run short on a CPU
        prompt = load(page, wf)["output"]
        prompt["5"]["inputs"].update(width=128, height=128)
        client_id = page.evaluate("async () => (await import('/scripts/api.js')).api.clientId")
        status, body = comfy_server.post_json("/api/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200, body
        assert comfy_server.wait_history(body["prompt_id"])["status"]["status_str"] == "success"
        # the node alone at a readable zoom, clear of the page's side bar and menus
        page.set_viewport_size({"width": 1280, "height": 1000})
        page.evaluate("""() => { const n = app.graph.getNodeById(13); const ds = app.canvas.ds; ds.scale = 1.4;
            ds.offset[0] = 300 / ds.scale - n.pos[0]; ds.offset[1] = 160 / ds.scale - n.pos[1]; }""")
        preview = page.wait_for_function("""async (url) => {
            const { maskPreview } = await import(url);
            app.canvas.setDirty(true, true); app.canvas.draw(true, true);
            const p = maskPreview(app.graph.getNodeById(13));
            return p && p.step === p.steps - 1 && p.tiles.length === 3 && p.tiles[0].shown && p;
        }""", arg=PREVIEW_JS, timeout=30000).json_value()
        assert [t["label"] for t in preview["tiles"]] == ["smiling", "glasses", "beard"]
        assert [t["active"] for t in preview["tiles"]] == [True, False, True]  # glasses: steps 10-30
        box = page.evaluate("""() => { const n = app.graph.getNodeById(13); const ds = app.canvas.ds;
            const r = app.canvas.canvas.getBoundingClientRect(); const t = LiteGraph.NODE_TITLE_HEIGHT;
            return {x: r.left + (n.pos[0] - 8 + ds.offset[0]) * ds.scale,
                    y: r.top + (n.pos[1] - t - 8 + ds.offset[1]) * ds.scale,
                    w: (n.size[0] + 16) * ds.scale, h: (n.size[1] + t + 16) * ds.scale}; }""")
        page.screenshot(path=str(out / "mask-preview.png"), clip={"x": box["x"], "y": box["y"],
                                                                   "width": box["w"], "height": box["h"]})
    finally:
        page.set_viewport_size({"width": 1600, "height": 1000})
        page.evaluate("() => app.extensionManager.setting.set('Comfy.Graph.CanvasInfo', true)")
    print(f"README pictures: {out}")


def test_readme_photo_picture(page_and_console, comfy_server, artifacts_dir):
    """The README's picture of a photo edit (docs/photo-edit-workflow.png), written to <artifacts>/readme/:
    example 10 as a user opens it, its checkpoint installed and ComfyUI's own input/example.png in
    Load Image's preview (the image the three photo examples name)."""
    import shutil

    from comfy_server import host_dir

    page = page_and_console[0]
    out = artifacts_dir / "readme"
    out.mkdir(exist_ok=True)
    wf = json.loads((WORKFLOWS_DIR / "10-photo-add-concept-sd15.json").read_text())
    image = next(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "LoadImage")
    shipped = host_dir() / "input" / image
    if not shipped.is_file():
        pytest.skip(f"this ComfyUI has no input/{image}")
    shutil.copyfile(shipped, comfy_server.base / "input" / image)
    install_example_checkpoint(comfy_server, wf)
    page.set_viewport_size({"width": 1440, "height": 760})
    try:
        page.evaluate("""async () => { await app.refreshComboInNodes();
            await app.extensionManager.setting.set('Comfy.Graph.CanvasInfo', false); }""")
        load(page, wf)
        page.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        # Load Image shows the photo once its preview has loaded
        page.wait_for_function("""() => { const n = app.graph.nodes.find(n => n.type === 'LoadImage');
            return n && n.imgs && n.imgs.length && n.imgs[0].complete && n.imgs[0].naturalWidth > 0; }""",
                               timeout=30000)
        page.wait_for_timeout(1500)  # a missing-model warning would have come by now
        page.evaluate("() => { app.canvas.setDirty(true, true); app.canvas.draw(true, true); }")
        page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        assert toasts(page) == []
        page.screenshot(path=str(out / "photo-edit-workflow.png"))
    finally:
        page.set_viewport_size({"width": 1600, "height": 1000})
        page.evaluate("() => app.extensionManager.setting.set('Comfy.Graph.CanvasInfo', true)")
    print(f"README picture: {out / 'photo-edit-workflow.png'}")
