"""The README's first command: run_sega.py runs a SEGA workflow through ComfyUI without the browser."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from comfy_host import PACK_ROOT, host_on_path


def _run(*args, tmp_path):
    # the same cache as the tests' tiny checkpoint ($SEGA_TEST_CACHE or $HOME/.cache/comfyui-sega)
    return subprocess.run([sys.executable, str(PACK_ROOT / "run_sega.py"), "--comfyui", str(host_on_path()),
                           "--output-dir", str(tmp_path), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)


def test_without_a_checkpoint_it_says_what_to_do(tmp_path):
    res = _run(tmp_path=tmp_path)
    assert res.returncode == 2
    assert "--checkpoint" in res.stderr and "--tiny" in res.stderr


def test_tiny_smoke_run_writes_both_images_side_by_side(tmp_path, tiny_sd15_checkpoint):
    from PIL import Image

    res = _run("--tiny", "--steps", "3", "--size", "64", tmp_path=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    images = sorted(tmp_path.glob("sega_run_*.png"))
    assert len(images) == 1 and str(images[0]) in res.stdout
    assert "01-add-concept-portrait-sd15.json" in res.stdout and "(glasses)" in res.stdout
    with Image.open(images[0]) as im:
        assert im.size == (64 * 2 + 8, 64)  # without SEGA | 8 px gap | with SEGA
        pixels = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert np.abs(pixels[:, :64] - pixels[:, 72:]).max() > 0, "SEGA changed nothing"
    assert res.stderr.count(" 0/3 [") == 2 and "3/3" in res.stderr  # progress bars: without and with SEGA


def test_runs_another_shipped_workflow(tmp_path, tiny_sd15_checkpoint):
    """--workflow: the stack of three concepts (example 04), with the workflow's own concepts."""
    res = _run("--tiny", "--steps", "2", "--size", "64", "--workflow",
               str(PACK_ROOT / "workflows" / "04-several-concepts-stack.json"), tmp_path=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(list(tmp_path.glob("sega_run_*.png"))) == 1


@pytest.mark.parametrize("args, message", [
    (["--workflow", "09b-replay-edit.json"], "at least one SEGA Concept"),
    (["--workflow", "04-several-concepts-stack.json", "--concept", "hat"], "--concept needs a workflow with one"),
    (["--workflow", "no-such-workflow.json"], "cannot read the workflow"),
])
def test_a_workflow_it_cannot_run_is_refused_with_the_reason(tmp_path, tiny_sd15_checkpoint, args, message):
    args[1] = str(PACK_ROOT / "workflows" / args[1])
    res = _run("--tiny", *args, tmp_path=tmp_path)
    assert res.returncode == 2 and message in res.stderr, res.stdout + res.stderr


def test_converts_every_shipped_workflow_for_comfyui(comfy_nodes):
    """ui_to_api gives prompts ComfyUI's validation accepts (the browser tests compare them with the frontend's)."""
    import execution
    import folder_paths
    from PIL import Image

    from harness.tiny import TINY_NAME
    from run_sega import ui_to_api

    checked = []
    for path in sorted((PACK_ROOT / "workflows").glob("*.json")):
        prompt = ui_to_api(json.loads(path.read_text()))
        kinds = {node["class_type"] for node in prompt.values()}
        if "SEGAReplayEdit" in kinds:
            continue  # it names a file a user would have (a saved edit)
        for node in prompt.values():  # the image Load Image names (ComfyUI ships input/example.png)
            if node["class_type"] == "LoadImage" and not folder_paths.exists_annotated_filepath(node["inputs"]["image"]):
                Image.new("RGB", (64, 64), (120, 90, 60)).save(Path(folder_paths.get_input_directory(),
                                                                    node["inputs"]["image"]))
        for node in prompt.values():
            if node["class_type"] == "CheckpointLoaderSimple":
                node["inputs"]["ckpt_name"] = TINY_NAME
        valid, error, _, node_errors = asyncio.run(execution.validate_prompt("t", prompt, None))
        assert valid, (path.name, error, node_errors)
        checked.append(path.stem)
    assert len(checked) >= 11, checked
    assert {"08-img2img", "10-photo-add-concept-sd15", "11-photo-remove-concept-sd15",
            "12-photo-edit-sdxl"} <= set(checked), checked


def _panels(path, width):
    """The three panels of a --image result (photo | reconstruction | edit, 8 px apart) as int arrays."""
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert pixels.shape[1] == 3 * width + 2 * 8, pixels.shape
    return [pixels[:, i * (width + 8):i * (width + 8) + width] for i in range(3)]


def test_image_inverts_and_edits_a_photo_side_by_side(tmp_path, tiny_sd15_checkpoint):
    """--image: the photo (scaled to --size on its longer side), its reconstruction and its edit in one
    image; at edit_scale 0 the edit is the reconstruction, pixel for pixel."""
    from PIL import Image

    photo = tmp_path / "photo in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(photo)
    res = _run("--tiny", "--image", str(photo), "--concept", "glasses", "--edit-scale", "8", "--steps", "3",
               "--size", "64", tmp_path=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    images = sorted(tmp_path.glob("sega_photo_*.png"))
    assert len(images) == 1 and str(images[0]) in res.stdout and "'glasses' added" in res.stdout
    photo_px, recon, edited = _panels(images[0], 64)
    assert photo_px.shape[0] == 48  # 128x96 scaled to 64x48
    assert np.abs(recon - edited).max() > 0, "the concept changed nothing"

    res = _run("--tiny", "--image", str(photo), "--concept", "glasses", "--edit-scale", "0", "--steps", "3",
               "--size", "64", "--direction", "remove", "--skip", "0.3", tmp_path=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    images = sorted(tmp_path.glob("sega_photo_*.png"))
    assert len(images) == 2 and "'glasses' removed" in res.stdout
    _, recon, edited = _panels(images[1], 64)
    assert np.array_equal(recon, edited)


@pytest.mark.parametrize("args, message", [
    (["--image", "{photo}"], "--image needs --concept"),
    (["--image", "{photo}", "--concept", "hat", "--cfg", "3"], "--cfg is not used"),
    (["--image", "{photo}", "--concept", "hat", "--skip", "1.0"], "--skip must be in [0, 1)"),
    (["--image", "{bad}", "--concept", "hat"], "cannot read the photo"),
    (["--image", "{missing}", "--concept", "hat"], "cannot read the photo"),
    (["--source", "a portrait"], "--source is an option of a photo edit: add --image PHOTO"),
])
def test_a_photo_edit_it_cannot_run_is_refused_with_the_reason(tmp_path, args, message):
    from PIL import Image

    Image.new("RGB", (64, 64), (120, 90, 60)).save(tmp_path / "photo.png")
    (tmp_path / "bad.png").write_text("not an image")
    names = {"photo": tmp_path / "photo.png", "bad": tmp_path / "bad.png", "missing": tmp_path / "missing.png"}
    res = _run("--tiny", *[a.format(**names) for a in args], tmp_path=tmp_path)
    assert res.returncode == 2 and message in res.stderr, res.stdout + res.stderr
    assert not list(tmp_path.glob("sega_photo_*.png"))


def _options(**given):
    import argparse

    names = ("checkpoint_name", "seed", "steps", "cfg", "size", "edit_scale", "direction", "warmup", "threshold",
             "prompt", "negative", "concept")
    return argparse.Namespace(**{name: given.get(name) for name in names})


def test_prompt_with_inline_concepts_adds_them_after_the_workflows(comfy_nodes):
    """--prompt with SEGA Prompt's syntax: the prompt lines go to the positive CLIP Text Encode, a SEGA
    Prompt node adds the typed concepts after the workflow's own, and the run without SEGA has them
    at edit scale 0."""
    from run_sega import apply_options, side_by_side, typed_concepts, typed_off, ui_to_api

    from harness.pack import pack_module

    text = "a portrait photo of a man\n+ hat :7 thr=0.5 @0.2-\n- (red scarf:1.2) w=0.5"
    prompt = ui_to_api(json.loads((PACK_ROOT / "workflows" / "01-add-concept-portrait-sd15.json").read_text()))
    apply_options(prompt, _options(prompt=text))
    sampler = next(n for n in prompt.values() if n["class_type"] == "SEGAKSampler")
    positive = prompt[sampler["inputs"]["positive"][0]]
    assert positive["inputs"]["text"] == "a portrait photo of a man"
    typed = prompt[sampler["inputs"]["concepts"][0]]
    assert typed["class_type"] == "SEGAPrompt" and typed["inputs"]["text"] == text
    assert prompt[typed["inputs"]["concepts"][0]]["class_type"] == "SEGAConcept"  # the workflow's glasses first
    both = side_by_side(prompt, "sega_run")
    typed_off(both, typed_concepts(text))
    parse = pack_module("sega_core.prompt_syntax").parse_prompt
    off = parse(both["base:sega_typed"]["inputs"]["text"])
    on = parse(both["sega_typed"]["inputs"]["text"])
    assert [c.scale for c in off.concepts] == [0.0, 0.0] and [c.scale for c in on.concepts] == [7.0, 5.0]
    assert [c.text for c in off.concepts] == [c.text for c in on.concepts] == ["hat", "(red scarf:1.2)"]
    assert off.prompt == on.prompt == "a portrait photo of a man"


def test_tiny_run_with_inline_concepts(tmp_path, tiny_sd15_checkpoint):
    res = _run("--tiny", "--steps", "3", "--size", "64", "--prompt",
               "a portrait photo of a man\n+ hat :7 thr=0.5 @0-", tmp_path=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(glasses, hat)" in res.stdout
    assert len(list(tmp_path.glob("sega_run_*.png"))) == 1


def test_prompt_syntax_errors_are_refused_with_line_and_column(tmp_path, tiny_sd15_checkpoint):
    res = _run("--tiny", "--prompt", "a portrait\n+ hat thr=2", tmp_path=tmp_path)
    assert res.returncode == 2
    assert "--prompt, line 2 col 7: 'thr=2' is outside [0, 1)" in res.stderr, res.stdout + res.stderr
