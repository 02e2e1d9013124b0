"""Workflows saved by ComfyUI's frontend (UI format) as API-format prompts, and the side-by-side
prompt run_sega.py runs (the workflow without SEGA and with it, on the same seed)."""
from __future__ import annotations

import json

from .host import PACK_ROOT

DEFAULT_WORKFLOW = PACK_ROOT / "workflows" / "01-add-concept-portrait-sd15.json"
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")  # a seed's "control after generate"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
NOTE_TYPES = ("Note", "MarkdownNote")


class WorkflowError(RuntimeError):
    """A workflow that run_sega.py cannot run; the message says why."""


def _is_widget(spec) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def node_input_types(kind: str):
    """The input definitions of a loaded node type (as GET /object_info gives them), or None."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS.get(kind)
    return None if cls is None else cls.INPUT_TYPES()


def _default(spec):
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], list) else options.get("options") or [None]
    return choices[0]


def ui_to_api(workflow: dict, input_types=node_input_types) -> dict:
    """The API-format prompt of a workflow saved by ComfyUI's frontend (UI format), as the
    frontend's "Export (API)" makes it for plain graphs: links become [node id, output slot],
    `widgets_values` fill the node's widget inputs in the order of its input definitions (a seed's
    "control after generate" value is skipped). Notes are left out; groups, reroutes, muted or
    bypassed nodes and subgraphs are refused. `input_types(kind)` gives a node type's input
    definitions (None for an unknown type)."""
    links = {link[0]: link for link in workflow.get("links", [])}  # [id, from, from_slot, to, to_slot, type]
    prompt = {}
    for node in workflow.get("nodes", []):
        kind = node.get("type")
        if kind in NOTE_TYPES:
            continue
        defs = input_types(kind)
        if defs is None:
            raise WorkflowError(f"node {node.get('id')}: '{kind}' is not a node of this ComfyUI "
                                f"(missing custom node, or a reroute/subgraph this script does not convert)")
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"node {node['id']} ({kind}) is muted or bypassed: un-mute it or pick another workflow")
        inputs = {}
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        values = list(node.get("widgets_values") or [])
        for name, spec in [*defs.get("required", {}).items(), *defs.get("optional", {}).items()]:
            if not _is_widget(spec):
                continue
            # a widget added to the node after the workflow was saved gets its default, as in the frontend
            value = values.pop(0) if values else _default(spec)
            inputs.setdefault(name, value)  # a widget turned into a linked input keeps its link
            if spec[0] == "INT" and values and values[0] in CONTROL_VALUES:
                values.pop(0)
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt


def nodes_of(prompt: dict, kind: str) -> list:
    return [n for n in prompt.values() if n["class_type"] == kind]


def source_of(prompt: dict, node: dict, name: str):
    link = node["inputs"].get(name)
    return prompt.get(link[0]) if isinstance(link, list) else None


def downstream(prompt: dict, roots: set) -> set:
    """Ids of `roots` and of every node that takes, directly or not, an output of one of them."""
    found = set(roots)
    changed = True
    while changed:
        changed = False
        for nid, node in prompt.items():
            if nid not in found and any(isinstance(v, list) and v and v[0] in found for v in node["inputs"].values()):
                found.add(nid)
                changed = True
    return found


def side_by_side(prompt: dict, prefix: str) -> dict:
    """One prompt that runs `prompt` twice, without SEGA (every SEGA Concept at edit_scale 0, which
    samples exactly as without SEGA) and with it, and saves both images side by side. Only the
    nodes after a SEGA Concept are doubled (the checkpoint loads once)."""
    saves = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
    concepts = {nid for nid, n in prompt.items() if n["class_type"] == "SEGAConcept"}
    if len(saves) != 1 or not concepts:
        raise WorkflowError("the workflow needs one SaveImage and at least one SEGA Concept "
                            f"(it has {len(saves)} SaveImage and {len(concepts)} SEGA Concept)")
    save = prompt[saves[0]]
    images = save["inputs"]["images"]
    out = {nid: n for nid, n in prompt.items() if nid != saves[0]}
    doubled = downstream(out, concepts)

    def base(link):
        return [f"base:{link[0]}", link[1]] if isinstance(link, list) and link and link[0] in doubled else link

    for nid in doubled:
        node = out[nid]
        inputs = {k: base(v) for k, v in node["inputs"].items()}
        if node["class_type"] == "SEGAConcept":
            inputs["edit_scale"] = 0.0
        out[f"base:{nid}"] = {"class_type": node["class_type"], "inputs": inputs}
    base_images = base(images)
    out["sega_stitch"] = {"class_type": "ImageStitch", "inputs": {
        "image1": base_images, "image2": images, "direction": "right", "match_image_size": True,
        "spacing_width": 8, "spacing_color": "white"}}
    out["sega_save"] = {"class_type": "SaveImage", "inputs": {"images": ["sega_stitch", 0], "filename_prefix": prefix}}
    return out


def small_run(prompt: dict, ckpt: str, steps: int = 3, size: int = 64) -> dict:
    """A copy of an API prompt for a quick run: checkpoint `ckpt`, `steps` sampler (and photo inversion)
    steps, size x size empty latents, every SEGA Concept still acting within the short run (warm-up at most 1, a
    cool-down that would fall inside the run moved to its last step)."""
    from .pack import NEVER

    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt
        if kind in ("KSampler", "SEGAKSampler", "BasicScheduler", "SEGAInvertPhoto"):
            inputs["steps"] = steps
        if kind == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = size
        if kind == "SEGAConcept":
            inputs["warmup"] = min(inputs["warmup"], 1)
            if inputs["cooldown"] < NEVER:
                inputs["cooldown"] = steps - 1
    return prompt
