"""This pack as the tests and the benchmarks drive it: imported as a package, node outputs
unwrapped, model rows counted, and the SEGA Concept node's inputs from one factory.

Nothing here imports ComfyUI at module level; call harness.host.prepare_host() first.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

from .host import PACK_ROOT

# The module name the pack is imported under here (its folder name may not be a valid module name).
MODULE_NAME = "comfyui_sega_under_test"

# The SEGA Concept node's cool-down that never triggers (the reference's None), the defaults of its
# required inputs and the optional inputs concept_inputs takes; tests/host/test_harness.py checks
# them against the node's own schema.
NEVER = 10000
CONCEPT_DEFAULTS = {"edit_scale": 5.0, "direction": "add", "threshold": 0.9, "warmup": 10, "cooldown": NEVER,
                    "weight": 1.0}
CONCEPT_OPTIONAL = ("label", "concepts", "mask", "window_unit", "mask_from", "attention_tokens")


def import_pack():
    """This pack as a package, imported once (as ComfyUI imports a custom node)."""
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


def pack_module(name: str):
    """A module of this pack (e.g. "nodes.patch"), imported inside the package."""
    import_pack()
    return importlib.import_module(f"{MODULE_NAME}.{name}")


def node_output(result):
    """The first output of a V1 node's (tuple) or V3 node's (NodeOutput) function result."""
    if isinstance(result, tuple):
        return result[0]
    values = getattr(result, "result", None) or getattr(result, "args", None)
    return values[0]


def concept_inputs(conditioning=None, **settings) -> dict:
    """The inputs of a SEGA Concept node: its defaults, `settings` over them, and `conditioning`
    (a tensor list for a direct call, a [node id, slot] link in an API prompt) when given."""
    unknown = set(settings) - set(CONCEPT_DEFAULTS) - set(CONCEPT_OPTIONAL)
    if unknown:
        raise TypeError(f"SEGA Concept has no input {sorted(unknown)}")
    inputs = {} if conditioning is None else {"conditioning": conditioning}
    inputs.update(CONCEPT_DEFAULTS)
    inputs.update(settings)
    return inputs


def concept_chain(conds: dict, settings: list, **common):
    """SEGA Concept nodes run one after another, each taking the previous one's CONCEPTS: one per
    (name, own settings) of `settings`, on conds[name], labelled name, with `common` under its own
    settings. Returns the last node's CONCEPTS."""
    node = pack_module("nodes.concept_nodes").SEGAConcept
    out = None
    for name, own in settings:
        out = node_output(node.execute(**concept_inputs(conds[name], label=name, concepts=out, **{**common, **own})))
    return out


def concept_node(conditioning, **settings) -> dict:
    """A SEGA Concept node of an API-format prompt."""
    return {"class_type": "SEGAConcept", "inputs": concept_inputs(conditioning, **settings)}


class ModelHook:
    """Base of the hooks the tests and the benchmarks put on a model: `attach(model)` returns a clone
    with the hook installed (`install`). ComfyUI v0.8.0 deep-copies model_options, and the hooks in
    them, when it clones a model: the copy is this same object, so it keeps recording."""

    def __deepcopy__(self, memo):
        return self

    def attach(self, model):
        m = model.clone()
        self.install(m)
        return m

    def install(self, model) -> None:
        raise NotImplementedError


class RowCounter(ModelHook):
    """Counts UNet calls and the rows of each, through ComfyUI's model function wrapper."""

    def __init__(self):
        self.rows = []
        self.cond_or_uncond = []
        self.y = []  # the pooled `y` conditioning of each call's rows, where the model has one

    def __call__(self, apply_model, args):
        self.rows.append(args["input"].shape[0])
        self.cond_or_uncond.append(list(args["cond_or_uncond"]))
        if "y" in args["c"]:
            self.y.append(args["c"]["y"].clone())
        return apply_model(args["input"], args["timestep"], **args["c"])

    def install(self, model) -> None:
        model.set_model_unet_function_wrapper(self)
