"""SEGA Save Edit / SEGA Replay Edit: record the edit of one run, replay it on another."""
from __future__ import annotations

import os

import pytest
import torch

from sega_testlib import apply_sega, concept, cond, node_output, pack_module, sample, tiny_sd15_model

STEPS = 5


@pytest.fixture(scope="module")
def model():
    return tiny_sd15_model()


@pytest.fixture()
def folders(tmp_path, monkeypatch):
    import folder_paths

    out, inp = tmp_path / "output", tmp_path / "input"
    out.mkdir()
    inp.mkdir()
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(out))
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(inp))
    return out, inp


def save_edit(model, prefix="sega/edit"):
    return node_output(pack_module("nodes.replay_nodes").SEGASaveEdit.execute(model, prefix))


def replay(model, name, strength=1.0):
    return node_output(pack_module("nodes.replay_nodes").SEGAReplayEdit.execute(model, name, strength))


def record_run(model, folders, seed=0, **kw):
    pos, neg, c1 = cond(1), cond(2), cond(3)
    m = apply_sega(save_edit(model), [concept(c1, warmup=1, scale=8.0, threshold=0.7)])
    out = sample(m, pos, neg, steps=STEPS, seed=seed, **kw)
    files = pack_module("nodes.edit_files").list_edit_files()
    assert files == ["sega/edit_00001_.safetensors [output]"]
    return out, files[0]


def test_replay_on_the_same_seed_reproduces_the_recorded_run(model, folders):
    pos, neg = cond(1), cond(2)
    recorded, name = record_run(model, folders)
    replayed = sample(replay(model, name), pos, neg, steps=STEPS, seed=0)
    torch.testing.assert_close(replayed, recorded, rtol=1e-5, atol=1e-5)
    plain = sample(model, pos, neg, steps=STEPS, seed=0)
    assert (plain - recorded).abs().max() > 1e-3
    # strength scales the edit; 0 is plain sampling
    assert torch.equal(sample(replay(model, name, 0.0), pos, neg, steps=STEPS, seed=0), plain)


def test_the_file_keeps_schedule_and_settings(model, folders):
    _, name = record_run(model, folders)
    files = pack_module("nodes.edit_files")
    rec = files.EditRecord.load(files.resolve_edit_file(name))
    assert len(rec.sigmas) == STEPS + 1 and rec.shape == [1, 4, 8, 8]
    assert sorted(rec.terms) == list(range(1, STEPS))  # no edit before the warm-up
    c = rec.settings["concepts"][0]
    assert (c["scale"], c["threshold"], c["warmup"]) == (8.0, 0.7, 1)
    assert rec.settings["momentum_scale"] == 0.1


def test_recorded_image_replays_on_other_seeds_and_a_batch(model, folders):
    pos, neg = cond(1), cond(2)
    _, name = record_run(model, folders)
    out = sample(replay(model, name), pos, neg, steps=STEPS, seed=3, batch=4)
    assert out.shape[0] == 4 and torch.isfinite(out).all()
    assert (out - sample(model, pos, neg, steps=STEPS, seed=3, batch=4)).abs().max() > 1e-3


def test_other_schedule_length_or_latent_size_is_refused(model, folders):
    pos, neg = cond(1), cond(2)
    errors = pack_module("nodes.errors")
    _, name = record_run(model, folders)
    with pytest.raises(errors.SEGAError, match=rf"SEGA Replay Edit: .*holds {STEPS} steps but this run has 7"):
        sample(replay(model, name), pos, neg, steps=7)
    with pytest.raises(errors.SEGAError, match=r"recorded on a latent of shape \[1, 4, 8, 8\].*\[1, 4, 16, 16\]"):
        sample(replay(model, name), pos, neg, steps=STEPS, size=16)


@pytest.mark.parametrize("bad", ["../escape.safetensors [output]", "/etc/passwd [input]",
                                 "sub/../../x.safetensors [output]", "link/secret.safetensors [output]",
                                 "missing.safetensors [input]", "notes.txt [output]"])
def test_file_names_outside_comfyui_folders_are_refused(model, folders, tmp_path, bad):
    out, _ = folders
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"x")
    os.symlink(outside, out / "link")
    (out / "notes.txt").write_text("x")
    errors = pack_module("nodes.errors")
    with pytest.raises(errors.SEGAError, match=r"SEGA Replay Edit: edit_file"):
        replay(model, bad)


@pytest.mark.parametrize("prefix", ["../x", "/tmp/x", "a/../../x", "link/x"])
def test_save_prefix_outside_the_output_folder_is_refused(model, folders, tmp_path, prefix):
    out, _ = folders
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "link")
    errors = pack_module("nodes.errors")
    pos, neg, c1 = cond(1), cond(2), cond(3)
    with pytest.raises(errors.SEGAError, match=r"SEGA Save Edit: filename_prefix"):
        m = apply_sega(save_edit(model, prefix), [concept(c1, warmup=0)])
        sample(m, pos, neg, steps=2)
    assert not any((tmp_path / "elsewhere").iterdir())


def test_a_file_that_is_not_a_sega_edit_is_refused(model, folders):
    from safetensors.torch import save_file

    out, _ = folders
    save_file({"w": torch.zeros(2)}, str(out / "model.safetensors"))
    errors = pack_module("nodes.errors")
    with pytest.raises(errors.SEGAError, match=r"not a SEGA edit file"):
        replay(model, "model.safetensors [output]")


def _example(name: str, ckpt: str, steps: int = 3, size: int = 64) -> dict:
    """A shipped example as the API prompt ComfyUI's frontend makes of it, on the tiny checkpoint
    with few steps and small latents."""
    import json

    from comfy_host import PACK_ROOT
    from harness.workflow import small_run, ui_to_api

    return small_run(ui_to_api(json.loads((PACK_ROOT / "workflows" / name).read_text())), ckpt, steps, size)


def test_example_workflows_record_on_one_seed_and_replay_on_four_others(ckpt, folders):
    """09a-save-edit saves an edit file; 09b-replay-edit, pointed at it, passes ComfyUI's validation
    and replays it on four seeds other than 09a's (what the browser tests also run, here without one)."""
    import numpy as np

    from comfy_host import run_prompt, saved_images

    record = _example("09a-save-edit.json", ckpt)
    recorded_seeds = {n["inputs"]["seed"] for n in record.values() if n["class_type"] == "SEGAKSampler"}
    assert len(saved_images(run_prompt(record))) == 1
    files = pack_module("nodes.edit_files").list_edit_files()
    assert files == ["sega/edit_00001_.safetensors [output]"]

    def replayed(strength):
        prompt = _example("09b-replay-edit.json", ckpt)
        for n in prompt.values():
            if n["class_type"] == "SEGAReplayEdit":
                n["inputs"].update(edit_file=files[0], strength=strength)
        seeds = [n["inputs"]["seed"] for n in prompt.values() if n["class_type"] == "KSampler"]
        assert len(seeds) == 4 and len(set(seeds) | recorded_seeds) == 5, (seeds, recorded_seeds)
        return saved_images(run_prompt(prompt))

    edited, plain = replayed(1.0), replayed(0.0)
    assert len(edited) == len(plain) == 4
    for e, p in zip(edited, plain):  # the edit acts on every one of the four seeds
        assert np.abs(e.astype(np.int16) - p.astype(np.int16)).max() > 0
