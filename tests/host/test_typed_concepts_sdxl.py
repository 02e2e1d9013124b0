"""SEGA Prompt on SDXL through ComfyUI's executor: typed concepts equal the wired graph bit for bit.

SDXL's text side is ComfyUI's own: SDXLTokenizer, SDXLClipModel (CLIP-L's penultimate layer and
CLIP-G's, concatenated; CLIP-G's projected pooled output), the CLIP wrapper and CLIP Text Encode.
Only the two text transformers are shrunk (16 wide, 3 layers, random weights), and families.py's
tiny SDXL UNet takes their output (context 32 = 16 + 16, pooled 16 + SDXL's size embeddings). A
throwaway pack loads that model and CLIP as one node, so whole prompts run through the executor.
"""
from __future__ import annotations

import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from comfy_host import load_pack
from harness.pack import concept_node
from sega_graphs import Queue, add_stack, save
from sega_testlib import node_output, pack_module

LOADER_PACK = '''
import copy
import json
import os

import torch

import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models_base


def _config(name: str, projection: int) -> dict:
    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), name)) as f:
        config = json.load(f)
    config.update(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=3,
                  projection_dim=projection)
    return config


class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
    """ComfyUI's SDXLClipModel with its two encoders built 16 wide and 3 layers deep (as SDXLClipModel
    and SDXLClipG build them otherwise: penultimate layers, CLIP-G's projected pooled output)."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        torch.nn.Module.__init__(self)
        self.clip_l = comfy.sd1_clip.SDClipModel(
            layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
            textmodel_json_config=_config("sd1_clip_config.json", 16), model_options=model_options)
        self.clip_g = comfy.sd1_clip.SDClipModel(
            layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
            textmodel_json_config=_config("clip_config_bigg.json", 16), return_projected_pooled=True,
            special_tokens={"start": 49406, "end": 49407, "pad": 0},
            model_options={**model_options, "model_name": "clip_g"})
        self.dtypes = set([dtype])


def tiny_sdxl_clip(seed: int = 0):
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in clip.cond_stage_model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return clip


class SEGATestTinySDXL:
    PARTS = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self):
        if SEGATestTinySDXL.PARTS is None:
            import comfy.supported_models
            import families

            # families.py's tiny SDXL UNet, its pooled input (adm) sized for this CLIP-G's 16-wide pooled
            # output plus SDXL's six 256-wide size embeddings
            cfg = families._unet(comfy.supported_models.SDXL, 32, model_channels=64, num_classes="sequential",
                                 adm_in_channels=16 + 6 * 256)
            model = families._built(comfy.supported_models.SDXL(cfg).get_model({}), 0, 0.03)
            SEGATestTinySDXL.PARTS = (model, tiny_sdxl_clip())
        return SEGATestTinySDXL.PARTS


NODE_CLASS_MAPPINGS = {"SEGATestTinySDXL": SEGATestTinySDXL}
'''

PROMPT = "a portrait photo of a man"
TYPED = f"""{PROMPT}
+ glasses :20 thr=0.5 @0-
- (red hat:1.2) :15 thr=0.6 w=0.5 @0.3-0.6
"""
WIRED = [("glasses", dict(edit_scale=20.0, threshold=0.5, warmup=0)),
         ("(red hat:1.2)", dict(edit_scale=15.0, threshold=0.6, weight=0.5, warmup=30, cooldown=60,
                                direction="remove", window_unit="percent"))]


@pytest.fixture(scope="module")
def loader(comfy_nodes, tmp_path_factory):
    import nodes

    pack = tmp_path_factory.mktemp("packs") / "sega-test-tiny-sdxl"
    pack.mkdir()
    (pack / "__init__.py").write_text(textwrap.dedent(LOADER_PACK))
    added = load_pack(pack)
    assert added == ["SEGATestTinySDXL"]
    yield nodes.NODE_CLASS_MAPPINGS["SEGATestTinySDXL"]
    for node_id in added:
        nodes.NODE_CLASS_MAPPINGS.pop(node_id, None)
        nodes.NODE_DISPLAY_NAME_MAPPINGS.pop(node_id, None)


def _graph() -> dict:
    sampler = {"model": ["xl", 0], "seed": 7, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
               "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0, "momentum_scale": 0.1,
               "momentum_beta": 0.4}
    g = {
        "xl": {"class_type": "SEGATestTinySDXL", "inputs": {}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["xl", 1]}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["xl", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "typed_prompt": {"class_type": "SEGAPrompt", "inputs": {"clip": ["xl", 1], "text": TYPED}},
        "typed": {"class_type": "SEGAKSampler", "inputs": dict(sampler, positive=["typed_prompt", 0],
                                                                concepts=["typed_prompt", 1])},
        "plain": {"class_type": "KSampler", "inputs": {k: v for k, v in sampler.items() if "momentum" not in k}
                  | {"positive": ["pos", 0]}},
    }
    refs = []
    for i, (text, settings) in enumerate(WIRED):
        g[f"w{i}_text"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["xl", 1]}}
        g[f"w{i}"] = concept_node([f"w{i}_text", 0], **settings)
        refs.append([f"w{i}", 0])
    g["wired"] = {"class_type": "SEGAKSampler", "inputs": dict(sampler, positive=["pos", 0],
                                                               concepts=add_stack(g, "stack", refs))}
    for name in ("typed", "wired", "plain"):
        save(g, f"{name}_out", [name, 0])
    return g


def test_sdxl_sega_prompt_equals_the_wired_graph(loader):
    out = Queue().run(_graph())
    assert out["typed_out"].shape == (1, 4, 8, 8)
    assert torch.equal(out["typed_out"], out["wired_out"])
    assert (out["typed_out"] - out["plain_out"]).abs().max() > 1e-3  # the concepts act


def test_sdxl_encoding_equals_clip_text_encode(loader):
    import nodes

    _, clip = loader().load()
    prompt_nodes = pack_module("nodes.prompt_nodes")
    for text in ("glasses", "(red hat:1.2)"):
        want = nodes.CLIPTextEncode().encode(clip, text)[0]
        assert want[0][0].shape[-1] == 32 and want[0][1]["pooled_output"].shape == (1, 16)
        spec = node_output(prompt_nodes.SEGAConceptText.execute(clip=clip, text=text, **concept_node(None)["inputs"]))[0]
        got = spec.conditioning
        assert torch.equal(got[0][0], want[0][0])
        assert torch.equal(got[0][1]["pooled_output"], want[0][1]["pooled_output"])
        assert set(got[0][1]) == set(want[0][1])
    other = nodes.CLIPTextEncode().encode(clip, "sunglasses")[0]
    assert not torch.equal(other[0][0], want[0][0])


SYNTAX = st.text(alphabet=st.sampled_from(list("ab :+-;@=#\\.\n0123456789()thrw,")), max_size=60)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=SYNTAX)
def test_sega_prompt_node_parses_or_raises_the_packs_error(loader, text):
    """Any text: SEGA Prompt's check before running accepts it and the node runs, or the check gives
    a message and the node raises the pack's SEGAError with the same message; never another error."""
    errors = pack_module("nodes.errors")
    spec_cls = pack_module("nodes.concept_spec").ConceptSpec
    cls = pack_module("nodes.prompt_nodes").SEGAPrompt
    _, clip = loader().load()
    said = cls.validate_inputs(text=text)
    if said is True:
        out = cls.execute(clip=clip, text=text)
        positive, concepts = out.result if getattr(out, "result", None) else out.args
        assert positive[0][0].shape[-1] == 32
        assert all(isinstance(c, spec_cls) and c.conditioning[0][0].shape[-1] == 32 for c in concepts)
    else:
        assert isinstance(said, str) and said.startswith("SEGA Prompt")
        with pytest.raises(errors.SEGAError) as refused:
            cls.execute(clip=clip, text=text)
        assert str(refused.value) == said
