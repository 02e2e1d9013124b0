"""Run a SEGA workflow through ComfyUI without the browser.

From the ComfyUI folder, with ComfyUI's Python:

    python custom_nodes/comfyui-sega/run_sega.py --checkpoint v1-5-pruned-emaonly.safetensors
    python custom_nodes/comfyui-sega/run_sega.py --tiny      # smoke test on a generated tiny model

It loads ComfyUI's nodes in this process, runs a shipped example workflow (--workflow: any saved
workflow with SEGA Concepts and one Save Image) once without SEGA (every concept at edit_scale 0,
which samples exactly as without SEGA) and once with it, on the same seed, and writes both images
side by side into ComfyUI's output folder.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import uuid
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent
CACHE_DIR = Path(os.environ.get("SEGA_TEST_CACHE") or Path.home() / ".cache" / "comfyui-sega")
TINY_NAME = "sega-tiny-sd15.safetensors"
TINY_FORMAT = "1"  # bump when build_tiny_sd15 changes: cached files of another format are rebuilt
TINY_SEED = 20230131

log = logging.getLogger("run_sega")


# -- finding and starting ComfyUI ------------------------------------------------------------------

def is_comfyui(path: Path) -> bool:
    return (path / "comfy").is_dir() and (path / "nodes.py").is_file()


def find_comfyui(explicit: str | None = None) -> Path | None:
    """--comfyui, else $COMFYUI_PATH, else the folder above custom_nodes/, else the current folder,
    else $HOME/ComfyUI."""
    candidates = [explicit, os.environ.get("COMFYUI_PATH")]
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append(str(PACK_ROOT.parent.parent))
    candidates += [os.getcwd(), str(Path.home() / "ComfyUI")]
    for c in candidates:
        if c and is_comfyui(Path(c).expanduser()):
            return Path(c).expanduser().resolve()
    return None


def use_comfyui(root: Path) -> None:
    """Put ComfyUI first on sys.path and select the CPU when torch has no GPU (before comfy imports)."""
    if str(root) not in sys.path[:1]:
        sys.path.insert(0, str(root))
    if "utils" not in sys.modules and (root / "utils" / "__init__.py").is_file():
        import utils  # noqa: F401  (ComfyUI's utils/ package, bound first as main.py does)
    import torch

    if not torch.cuda.is_available():
        import comfy.cli_args

        comfy.cli_args.args.cpu = True


def init_nodes(load_pack: bool = True) -> None:
    """Load ComfyUI's built-in and custom nodes; load this pack too if it is not in custom_nodes/."""
    import nodes
    import server

    # a PromptServer that is never started, as main.py makes one: some nodes use it while loading
    if getattr(server.PromptServer, "instance", None) is None:
        server.PromptServer(asyncio.new_event_loop())
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    if load_pack and "SEGAKSampler" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.load_custom_node(str(PACK_ROOT)))
    if load_pack and "SEGAKSampler" not in nodes.NODE_CLASS_MAPPINGS:
        raise RuntimeError("the SEGA nodes did not load: see the log above (ComfyUI v0.8.0 or newer is needed)")


class PromptError(RuntimeError):
    """A prompt failed validation or execution; the message is ComfyUI's."""


class PromptValidationError(PromptError):
    """ComfyUI's validation refused the prompt; the message lists every node error."""


class PromptExecutionError(PromptError):
    """A node failed while the prompt ran; the message has the node, the exception and its traceback."""


class _Server:
    """The few members of ComfyUI's PromptServer that the executor uses; keeps every event."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.events: list = []

    def send_sync(self, event, data, sid=None) -> None:
        self.events.append((event, data))


def _validation_message(error: dict, node_errors: dict) -> str:
    lines = [f"{error.get('message', error)}: {error.get('details', '')}".rstrip(": ")]
    for node_id, info in node_errors.items():
        for e in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details', '')}")
    return "\n".join(lines)


def execute_prompt(prompt: dict, server=None) -> dict:
    """Validate and run an API-format prompt with ComfyUI's own executor, without caching.

    Returns the outputs by node id; raises PromptError with ComfyUI's message on failure.
    """
    import execution

    prompt_id = uuid.uuid4().hex
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise PromptValidationError(_validation_message(error, node_errors))
    server = server or _Server()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.NONE,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    executor.execute(prompt, prompt_id, {}, outputs)
    events = list(executor.status_messages) + list(getattr(server, "events", []))
    for event, data in events:
        if event == "execution_error":
            tb = "".join(data.get("traceback") or [])
            raise PromptExecutionError(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                              f"{data.get('exception_type')}: {data.get('exception_message')}\n{tb}")
        if event == "execution_interrupted":
            raise PromptExecutionError(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})")
    if not executor.success or not any(event == "execution_success" for event, _ in events):
        raise PromptExecutionError(f"the prompt did not finish; events: {[e for e, _ in events]}")
    return executor.history_result["outputs"]


# -- a tiny random-weight checkpoint for smoke tests ----------------------------------------------

# ComfyUI detects SD15 from model_channels=320, context_dim=768, use_linear_in_transformer=False and
# one transformer block; everything else shrinks (one level, one res block, no middle block).
TINY_SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "transformer_depth_middle": -2, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
# The full SD VAE: ComfyUI v0.8.0 does not infer a smaller decoder from the weights.
SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}


def _init_weights(module) -> None:
    """Deterministic weights for modules built with ComfyUI's ops, which skip initialisation."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for m in module.modules():
            for cls in type(m).__mro__:
                if cls.__module__.startswith("torch.nn.modules") and "reset_parameters" in cls.__dict__:
                    cls.reset_parameters(m)
                    break


def build_tiny_sd15(path: Path, seed: int = TINY_SEED) -> Path:
    """Write a random-weight checkpoint in the SD1.5 layout (fp16 safetensors, ~450 MB) to `path`."""
    import torch

    import comfy.supported_models
    import comfy.utils
    from comfy.ldm.models.autoencoder import AutoencoderKL

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = comfy.supported_models.SD15(dict(TINY_SD15_UNET))
        unet = config.get_model({}, device="cpu").diffusion_model
        clip = config.clip_target().clip(device="cpu", dtype=torch.float32)
        vae = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
        for m in (unet, clip, vae):
            _init_weights(m)
    sd = config.process_unet_state_dict_for_saving(unet.state_dict())
    sd.update(config.process_clip_state_dict_for_saving(clip.state_dict()))
    sd.update(config.process_vae_state_dict_for_saving(vae.state_dict()))
    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        comfy.utils.save_torch_file(sd, str(tmp), metadata={
            "sega_tiny_format": TINY_FORMAT, "sega_tiny_seed": str(seed),
            "description": "random weights in the SD1.5 layout, for smoke tests only"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def tiny_checkpoint(folder: Path = CACHE_DIR / "models" / "checkpoints") -> Path:
    """The tiny checkpoint in `folder`, built on first use (about 10 s) and reused after."""
    from safetensors import safe_open

    path = folder / TINY_NAME
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("sega_tiny_format") == TINY_FORMAT:
                    return path
        except Exception:  # truncated or foreign file: rebuild it
            pass
    return build_tiny_sd15(path)


# -- the workflow ----------------------------------------------------------------------------------

DEFAULT_WORKFLOW = PACK_ROOT / "workflows" / "01-add-concept-portrait-sd15.json"
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")  # a seed's "control after generate"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
NOTE_TYPES = ("Note", "MarkdownNote")


class WorkflowError(RuntimeError):
    """A workflow file this script cannot run; the message says why."""


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


def _nodes_of(prompt: dict, kind: str) -> list:
    return [n for n in prompt.values() if n["class_type"] == kind]


def _source(prompt: dict, node: dict, name: str):
    link = node["inputs"].get(name)
    return prompt.get(link[0]) if isinstance(link, list) else None


def _downstream(prompt: dict, roots: set) -> set:
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
    doubled = _downstream(out, concepts)

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


def apply_options(prompt: dict, args) -> None:
    """The command line's settings, where given, over the workflow's own."""
    def set_all(name, value, kinds=None):
        if value is not None:
            for node in prompt.values():
                if name in node["inputs"] and (kinds is None or node["class_type"] in kinds):
                    node["inputs"][name] = value

    set_all("ckpt_name", args.checkpoint_name, ("CheckpointLoaderSimple",))
    for name in ("seed", "noise_seed"):
        set_all(name, args.seed)
    set_all("steps", args.steps)
    set_all("cfg", args.cfg)
    set_all("width", args.size, ("EmptyLatentImage",))
    set_all("height", args.size, ("EmptyLatentImage",))
    for option, kind in (("edit_scale", "edit_scale"), ("direction", "direction"), ("warmup", "warmup")):
        set_all(kind, getattr(args, option), ("SEGAConcept",))
    for role in ("positive", "negative"):
        text = getattr(args, "prompt" if role == "positive" else "negative")
        if text is None:
            continue
        for node in list(prompt.values()):
            source = _source(prompt, node, role)
            if source is not None and source["class_type"] == "CLIPTextEncode":
                source["inputs"]["text"] = text
    if args.concept is not None:
        concepts = _nodes_of(prompt, "SEGAConcept")
        if len(concepts) != 1:
            raise WorkflowError(f"--concept needs a workflow with one SEGA Concept; this one has {len(concepts)}")
        source = _source(prompt, concepts[0], "conditioning")
        if source is None or source["class_type"] != "CLIPTextEncode":
            raise WorkflowError("--concept: the SEGA Concept's conditioning does not come from a CLIP Text Encode")
        source["inputs"]["text"] = args.concept
        concepts[0]["inputs"]["label"] = args.concept


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a checkpoint in ComfyUI's models/checkpoints (an SD 1.x model fits "
                                        "the default workflow)")
    p.add_argument("--tiny", action="store_true", help="smoke test: a generated random-weight SD1.5 model "
                                                       "(the image is noise; it checks that everything runs)")
    p.add_argument("--workflow", default=str(DEFAULT_WORKFLOW),
                   help="a workflow saved by ComfyUI (UI format) with SEGA Concepts and one Save Image "
                        "(default: the pack's example 01, 'glasses' added to a portrait)")
    p.add_argument("--comfyui", help="the ComfyUI folder (default: found from this file or the current folder)")
    p.add_argument("--prompt", help="the positive prompt's text (default: the workflow's)")
    p.add_argument("--negative", help="the negative prompt's text")
    p.add_argument("--concept", help="the concept's text (workflows with one SEGA Concept)")
    p.add_argument("--direction", choices=["add", "remove"])
    p.add_argument("--edit-scale", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--size", type=int, help="width and height of the empty latent image, in pixels")
    p.add_argument("--output-dir", help="where the image goes (default: ComfyUI's output folder)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    root = find_comfyui(args.comfyui)
    if root is None:
        print("ComfyUI not found: run this from the ComfyUI folder, or pass --comfyui PATH.", file=sys.stderr)
        return 2
    use_comfyui(root)
    import folder_paths

    if args.output_dir:
        folder_paths.set_output_directory(str(Path(args.output_dir).resolve()))

    if args.tiny:
        ckpt_path = tiny_checkpoint()
        folder_paths.add_model_folder_path("checkpoints", str(ckpt_path.parent))
        args.checkpoint_name = ckpt_path.name
        # a quick run: the tiny model's images are noise whatever the settings
        args.steps = 8 if args.steps is None else args.steps
        args.warmup = 2 if args.warmup is None else args.warmup
        args.size = 64 if args.size is None else args.size
    else:
        available = folder_paths.get_filename_list("checkpoints")
        if not args.checkpoint or args.checkpoint not in available:
            which = f"'{args.checkpoint}' is not" if args.checkpoint else "no --checkpoint"
            print(f"{which} among ComfyUI's checkpoints ({root / 'models' / 'checkpoints'}).", file=sys.stderr)
            print("Put a checkpoint there (an SD 1.5 model fits the default workflow) and pass --checkpoint NAME, "
                  "or run with --tiny for a smoke test on a generated model.", file=sys.stderr)
            if available:
                print("Available: " + ", ".join(available), file=sys.stderr)
            return 2
        args.checkpoint_name = args.checkpoint
    try:
        with open(args.workflow, encoding="utf-8") as f:
            workflow = json.load(f)
    except (OSError, ValueError) as e:
        print(f"cannot read the workflow {args.workflow}: {e}", file=sys.stderr)
        return 2
    init_nodes()
    try:
        prompt = ui_to_api(workflow)
        apply_options(prompt, args)
        prompt = side_by_side(prompt, "sega_run")
    except WorkflowError as e:
        print(f"{Path(args.workflow).name}: {e}", file=sys.stderr)
        return 2
    outputs = execute_prompt(prompt)
    image = outputs["sega_save"]["images"][0]
    result = Path(folder_paths.get_output_directory()) / image.get("subfolder", "") / image["filename"]
    labels = [n["inputs"].get("label") or "a concept" for nid, n in prompt.items()
              if n["class_type"] == "SEGAConcept" and not nid.startswith("base:")]
    print(f"{Path(args.workflow).name}: without SEGA (left) and with SEGA ({', '.join(labels)}) (right): {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
