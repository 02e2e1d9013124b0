"""SEGA Prompt and SEGA Concept (text) inside ComfyUI, and windows as percent of the schedule.

Typed concepts and the same concepts wired (CLIP Text Encode -> SEGA Concept -> stack) give the
same latent bit for bit through ComfyUI's executor on the tiny SD1.5 checkpoint; the text is
encoded exactly as CLIP Text Encode encodes it. SDXL: test_typed_concepts_sdxl.py.
"""
from __future__ import annotations

import pytest
import torch

from comfy_host import PromptValidationError
from harness.pack import concept_node
from sega_graphs import Queue, add_ksampler, add_sega_ksampler, add_stack, graph, save
from sega_testlib import node_output, pack_module

PROMPT = "a portrait photo of a man"
# typed text, and each concept's (text, SEGA Concept settings) as wired
TYPED = f"""{PROMPT}
# strong settings: the random model's prompts differ little
+ glasses :20 thr=0.5 @0-
- (red hat:1.2) :15 thr=0.6 w=0.5 @1-3
"""
WIRED = [("glasses", dict(edit_scale=20.0, threshold=0.5, warmup=0)),
         ("(red hat:1.2)", dict(edit_scale=15.0, threshold=0.6, weight=0.5, warmup=1, cooldown=3,
                                direction="remove"))]


@pytest.fixture(scope="module")
def queue(ckpt):
    return Queue()


def _wire(g: dict, concepts: list, prefix: str = "w") -> list:
    refs = []
    for i, (text, settings) in enumerate(concepts):
        g[f"{prefix}{i}_text"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}}
        g[f"{prefix}{i}"] = concept_node([f"{prefix}{i}_text", 0], **settings)
        refs.append([f"{prefix}{i}", 0])
    return refs[0] if len(refs) == 1 else add_stack(g, f"{prefix}_stack", refs)


def _typed_and_wired(ckpt, text: str, concepts: list, prompt: str = PROMPT) -> dict:
    """One prompt: SEGA Prompt -> SEGA KSampler ("typed"), the wired graph ("wired"), plain KSampler."""
    g = graph(ckpt)
    g["pos"]["inputs"]["text"] = prompt
    g["typed_prompt"] = {"class_type": "SEGAPrompt", "inputs": {"clip": ["ckpt", 1], "text": text}}
    add_sega_ksampler(g, "typed", ["typed_prompt", 1], positive=["typed_prompt", 0])
    add_sega_ksampler(g, "wired", _wire(g, concepts))
    add_ksampler(g, "plain")
    for name in ("typed", "wired", "plain"):
        save(g, f"{name}_out", [name, 0])
    return g


def test_sega_prompt_equals_the_wired_graph(ckpt, queue):
    out = queue.run(_typed_and_wired(ckpt, TYPED, WIRED))
    assert torch.equal(out["typed_out"], out["wired_out"])
    assert (out["typed_out"] - out["plain_out"]).abs().max() > 1e-3  # the concepts act


def test_fraction_window_equals_percent_and_steps(ckpt, queue):
    """@0.3-0.6 of a 3-step run is step 1 only (0.3 <= 1/3 < 0.6 <= 2/3), as SEGA Concept's window_unit
    percent 30-60 and its warmup 1, cooldown 2 in steps."""
    text = f"{PROMPT}\n+ glasses :20 thr=0.5 @0.3-0.6"
    percent = [("glasses", dict(edit_scale=20.0, threshold=0.5, warmup=30, cooldown=60, window_unit="percent"))]
    g = _typed_and_wired(ckpt, text, percent)
    add_sega_ksampler(g, "steps", _wire(g, [("glasses", dict(edit_scale=20.0, threshold=0.5, warmup=1,
                                                              cooldown=2))], prefix="s"))
    add_sega_ksampler(g, "whole", _wire(g, [("glasses", dict(edit_scale=20.0, threshold=0.5, warmup=0))],
                                        prefix="a"))
    out = queue.run(save(save(g, "steps_out", ["steps", 0]), "whole_out", ["whole", 0]))
    assert torch.equal(out["typed_out"], out["wired_out"])
    assert torch.equal(out["typed_out"], out["steps_out"])
    assert (out["typed_out"] - out["plain_out"]).abs().max() > 1e-3
    assert (out["typed_out"] - out["whole_out"]).abs().max() > 1e-3  # the window leaves steps 0 and 2 out


def test_percent_window_follows_the_step_count(ckpt, queue):
    """window_unit percent 50-100: from step 2 of 4 and from step 3 of 6 (steps: 0.5 <= i / N)."""
    outs = {}
    for steps, warmup in [(4, 2), (6, 3)]:
        g = graph(ckpt)
        add_sega_ksampler(g, "percent", _wire(g, [("glasses", dict(edit_scale=20.0, threshold=0.5, warmup=50,
                                                                    window_unit="percent"))]), steps=steps)
        add_sega_ksampler(g, "steps", _wire(g, [("glasses", dict(edit_scale=20.0, threshold=0.5, warmup=warmup))],
                                            prefix="s"), steps=steps)
        outs[steps] = queue.run(save(save(g, "percent_out", ["percent", 0]), "steps_out", ["steps", 0]))
        assert torch.equal(outs[steps]["percent_out"], outs[steps]["steps_out"]), steps


def test_sega_concept_text_equals_the_wired_graph(ckpt, queue):
    g = _typed_and_wired(ckpt, PROMPT, WIRED)
    g.pop("typed_prompt")
    prev = None
    for i, (text, settings) in enumerate(WIRED):
        inputs = {"clip": ["ckpt", 1], "text": text, **concept_node(None, **settings)["inputs"]}
        if prev is not None:
            inputs["concepts"] = prev
        g[f"t{i}"] = {"class_type": "SEGAConceptText", "inputs": inputs}
        prev = [f"t{i}", 0]
    g["typed"]["inputs"].update(concepts=prev, positive=["pos", 0])
    out = queue.run(g)
    assert torch.equal(out["typed_out"], out["wired_out"])
    assert (out["typed_out"] - out["plain_out"]).abs().max() > 1e-3


def test_default_window_unit_keeps_steps(comfy_nodes):
    """A saved SEGA Concept (no window_unit) makes the concept it made before: windows in steps."""
    cls = pack_module("nodes.concept_nodes").SEGAConcept
    inputs = concept_node([[torch.zeros(1, 77, 768), {}]], warmup=3, cooldown=9)["inputs"]
    old = node_output(cls.execute(**inputs))[0].concept
    assert (old.warmup, old.cooldown, old.window_unit) == (3, 9, "steps")
    new = node_output(cls.execute(**inputs, window_unit="percent"))[0].concept
    assert (new.warmup, new.cooldown, new.window_unit) == (0.03, 0.09, "fraction")


@pytest.fixture(scope="module")
def clip(ckpt):
    import nodes

    return nodes.CheckpointLoaderSimple().load_checkpoint(ckpt)[1]


def _equal_conditioning(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for (ta, da), (tb, db) in zip(a, b):
        if not torch.equal(ta, tb) or set(da) != set(db):
            return False
        for k in da:
            va, vb = da[k], db[k]
            if isinstance(va, torch.Tensor) and not torch.equal(va, vb):
                return False
    return True


@pytest.mark.parametrize("text", ["glasses", "(red hat:1.2), embedding-free text", "a " * 100])
def test_encoding_equals_clip_text_encode(clip, text):
    import nodes

    prompt_nodes = pack_module("nodes.prompt_nodes")
    want = nodes.CLIPTextEncode().encode(clip, text)[0]
    spec = node_output(prompt_nodes.SEGAConceptText.execute(
        clip=clip, text=text, **concept_node(None)["inputs"]))[0]
    assert _equal_conditioning(spec.conditioning, want)
    typed = prompt_nodes.SEGAPrompt.execute(clip=clip, text=f"{text}\n+ {text}")
    positive, concepts = typed.result if getattr(typed, "result", None) else typed.args
    assert _equal_conditioning(positive, want) and _equal_conditioning(concepts[0].conditioning, want)
    other = nodes.CLIPTextEncode().encode(clip, text + " x")[0]
    assert not _equal_conditioning(other, want)  # the comparison can tell


def test_syntax_errors_are_refused_before_running(ckpt):
    from comfy_host import run_prompt

    g = graph(ckpt)
    g["typed_prompt"] = {"class_type": "SEGAPrompt", "inputs": {"clip": ["ckpt", 1], "text": f"{PROMPT}\n+ glasses thr=1.5"}}
    add_sega_ksampler(g, "typed", ["typed_prompt", 1], positive=["typed_prompt", 0])
    save(g, "typed_out", ["typed", 0])
    with pytest.raises(PromptValidationError,
                       match=r"node typed_prompt \(SEGAPrompt\).*SEGA Prompt, line 2 col 11: 'thr=1.5' is outside "
                             r"\[0, 1\)"):
        run_prompt(g)


def test_sega_concept_text_has_sega_concepts_settings(registry_inputs):
    """SEGA Concept (text) is SEGA Concept with clip and text in place of conditioning: the same
    settings, in the same order, with the same definitions (one function gives both)."""
    concept, text = registry_inputs("SEGAConcept"), registry_inputs("SEGAConceptText")
    assert list(text)[:2] == ["clip", "text"] and list(concept)[0] == "conditioning"
    assert list(text)[2:] == list(concept)[1:]
    shared = ["edit_scale", "direction", "threshold", "warmup", "cooldown", "weight", "mask_from", "window_unit"]
    assert all(text[name] == concept[name] for name in shared)


def test_sega_concept_text_passes_every_setting(clip):
    cls = pack_module("nodes.prompt_nodes").SEGAConceptText
    spec = node_output(cls.execute(clip=clip, text="glasses", **concept_node(
        None, edit_scale=3.0, direction="remove", threshold=0.7, warmup=20, cooldown=90, weight=0.5,
        window_unit="percent")["inputs"], mask_from="intersect"))[0]
    c = spec.concept
    assert (c.scale, c.reverse, c.threshold, c.warmup, c.cooldown, c.weight, c.mask_from, c.window_unit) == (
        3.0, True, 0.7, 0.2, 0.9, 0.5, "intersect", "fraction")
    assert spec.label == "glasses"


@pytest.fixture(scope="module")
def registry_inputs(comfy_nodes):
    import nodes

    def inputs(node_id):
        spec = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        return {name: value for section in ("required", "optional") for name, value in spec.get(section, {}).items()}
    return inputs


def test_sega_concept_text_needs_text(clip):
    errors = pack_module("nodes.errors")
    cls = pack_module("nodes.prompt_nodes").SEGAConceptText
    with pytest.raises(errors.SEGAError, match=r"SEGA Concept \(text\): the text is empty"):
        cls.execute(clip=clip, text="  ", **concept_node(None)["inputs"])


def test_percent_warmup_above_100_is_refused(comfy_nodes):
    errors = pack_module("nodes.errors")
    cls = pack_module("nodes.concept_nodes").SEGAConcept
    inputs = concept_node([[torch.zeros(1, 77, 768), {}]], warmup=150, window_unit="percent")["inputs"]
    with pytest.raises(errors.SEGAError, match=r"SEGA Concept: warmup is a percent of the run's steps "
                                               r"\(window_unit percent\): 0 to 100, got 150"):
        cls.execute(**inputs)


def test_photo_edit_percent_window_equals_steps(comfy_nodes):
    """SEGA Photo Edit turns a percent window into steps of the inversion's schedule: 50% of 4 steps
    is from step 2, as warmup 2 in steps."""
    from families import FAMILIES

    photo_edit = pack_module("nodes.photo_edit")
    concept_cls = pack_module("nodes.concept_nodes").SEGAConcept
    family = FAMILIES["sd15"]
    model = family.build()
    latent = {"samples": torch.randn(1, *family.latent, generator=torch.Generator().manual_seed(0))}
    inversion = node_output(photo_edit.SEGAInvertPhoto.execute(
        model=model, latent=latent, uncond=family.cond(1), steps=4, skip=0.15, seed=3, source=None,
        source_guidance=3.5))

    def edit(**settings):
        concepts = node_output(concept_cls.execute(**concept_node(family.cond(5), threshold=0.0, **settings)["inputs"]))
        return node_output(photo_edit.SEGAPhotoEdit.execute(model=model, inversion=inversion, concepts=concepts,
                                                            combination="ledits", reconstruction="exact"))["samples"]

    percent = edit(warmup=50, window_unit="percent")
    assert torch.equal(percent, edit(warmup=2))
    assert (percent - edit(warmup=0)).abs().max() > 1e-4
