"""The in-process harness itself: a V3 (comfy_entrypoint) pack loads, its nodes run through
run_prompt, saved images come back, and failures surface with ComfyUI's own message."""
import textwrap

import numpy as np
import pytest

from comfy_host import PromptExecutionError, PromptValidationError, load_pack, run_prompt, saved_images

DUMMY_PACK = '''
import torch
from comfy_api.latest import ComfyExtension, io


class HarnessGray(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="HarnessDummyGray", category="testing",
                         inputs=[io.Int.Input("size", default=8, min=1), io.Float.Input("level", default=0.5)],
                         outputs=[io.Image.Output()])

    @classmethod
    def execute(cls, size, level):
        if level < 0:
            raise ValueError("HarnessDummyGray: level must be >= 0")
        return io.NodeOutput(torch.full((1, size, size + 1, 3), level))


class _Extension(ComfyExtension):
    async def get_node_list(self):
        return [HarnessGray]


async def comfy_entrypoint():
    return _Extension()
'''


@pytest.fixture(scope="module")
def dummy_pack(comfy_nodes, tmp_path_factory):
    import nodes

    pack = tmp_path_factory.mktemp("packs") / "harness-dummy-pack"
    pack.mkdir()
    (pack / "__init__.py").write_text(textwrap.dedent(DUMMY_PACK))
    added = load_pack(pack)
    yield added
    for node_id in added:
        nodes.NODE_CLASS_MAPPINGS.pop(node_id, None)
        nodes.NODE_DISPLAY_NAME_MAPPINGS.pop(node_id, None)


def gray_prompt(size=8, level=0.5):
    return {
        "1": {"class_type": "HarnessDummyGray", "inputs": {"size": size, "level": level}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "harness"}},
    }


def test_v3_entrypoint_pack_registers_its_nodes(dummy_pack):
    assert dummy_pack == ["HarnessDummyGray"]


def test_run_prompt_returns_saved_images(dummy_pack):
    images = saved_images(run_prompt(gray_prompt(size=6, level=0.25)))
    assert len(images) == 1
    assert images[0].shape == (6, 7, 3)
    assert np.all(images[0] == 63)  # SaveImage truncates: int(0.25 * 255)


def test_run_prompt_raises_the_node_error(dummy_pack):
    with pytest.raises(PromptExecutionError, match=r"node 1 \(HarnessDummyGray\).*level must be >= 0"):
        run_prompt(gray_prompt(level=-1.0))


def test_run_prompt_raises_the_validation_error(comfy_nodes):
    with pytest.raises(PromptValidationError, match="NoSuchNode"):
        run_prompt({"1": {"class_type": "NoSuchNode", "inputs": {}}})


def test_run_prompt_names_the_bad_input(dummy_pack):
    prompt = gray_prompt()
    prompt["1"]["inputs"]["size"] = 0
    with pytest.raises(PromptValidationError, match=r"node 1 \(HarnessDummyGray\).*size"):
        run_prompt(prompt)


def test_concept_inputs_are_the_concept_nodes_defaults(comfy_nodes):
    """harness.pack.concept_inputs, which the tests and the benchmarks build SEGA Concepts with, has
    exactly the node's required inputs and their defaults (a new required setting must be added
    there too), and only optional inputs the node has."""
    import nodes

    from harness.pack import CONCEPT_DEFAULTS, CONCEPT_OPTIONAL, NEVER, concept_inputs

    spec = nodes.NODE_CLASS_MAPPINGS["SEGAConcept"].INPUT_TYPES()
    required, optional = spec["required"], spec.get("optional", {})
    assert set(required) == {"conditioning", *CONCEPT_DEFAULTS}
    assert set(CONCEPT_OPTIONAL) <= set(optional)
    assert {name: required[name][1]["default"] for name in CONCEPT_DEFAULTS} == CONCEPT_DEFAULTS
    assert required["cooldown"][1]["max"] == NEVER
    assert concept_inputs(["t", 0], warmup=3, label="x") == {"conditioning": ["t", 0], **CONCEPT_DEFAULTS,
                                                             "warmup": 3, "label": "x"}
    with pytest.raises(TypeError, match="cooldwn"):
        concept_inputs(cooldwn=3)
