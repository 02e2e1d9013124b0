"""Run a SEGA workflow through ComfyUI without the browser.

From the ComfyUI folder, with ComfyUI's Python:

    python custom_nodes/comfyui-sega/run_sega.py --checkpoint v1-5-pruned-emaonly.safetensors
    python custom_nodes/comfyui-sega/run_sega.py --tiny      # smoke test on a generated tiny model

It loads ComfyUI's nodes in this process, runs a shipped example workflow (--workflow: any saved
workflow with SEGA Concepts and one Save Image) once without SEGA (every concept at edit_scale 0,
which samples exactly as without SEGA) and once with it, on the same seed, and writes both images
side by side into ComfyUI's output folder. Finding ComfyUI, running the prompt and the tiny model
are harness/'s, shared with the tests and the benchmarks.

Edit a photo instead (LEDITS++: SEGA Invert Photo, then SEGA Photo Edit), writing the photo, its
reconstruction (no concept) and its edit side by side:

    python custom_nodes/comfyui-sega/run_sega.py --checkpoint v1-5-pruned-emaonly.safetensors \
        --image portrait.png --concept glasses
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path

from harness.host import PACK_ROOT, HostError, find_comfyui, init_nodes, prepare_host
from harness.prompts import PromptError, execute_prompt
from harness.tiny import tiny_checkpoint
from harness.workflow import DEFAULT_WORKFLOW, WorkflowError, nodes_of, side_by_side, source_of, ui_to_api

log = logging.getLogger("run_sega")


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
    for option, kind in (("edit_scale", "edit_scale"), ("direction", "direction"), ("warmup", "warmup"),
                         ("threshold", "threshold")):
        set_all(kind, getattr(args, option), ("SEGAConcept",))
    typed = typed_concepts(args.prompt)
    for role in ("positive", "negative"):
        text = getattr(args, "prompt" if role == "positive" else "negative")
        if role == "positive" and typed is not None:
            text = typed.prompt or None  # the prompt lines of a --prompt with inline concepts
        if text is None:
            continue
        for node in list(prompt.values()):
            source = source_of(prompt, node, role)
            if source is not None and source["class_type"] == "CLIPTextEncode":
                source["inputs"]["text"] = text
    if args.concept is not None:
        concepts = nodes_of(prompt, "SEGAConcept")
        if len(concepts) != 1:
            raise WorkflowError(f"--concept needs a workflow with one SEGA Concept; this one has {len(concepts)}")
        source = source_of(prompt, concepts[0], "conditioning")
        if source is None or source["class_type"] != "CLIPTextEncode":
            raise WorkflowError("--concept: the SEGA Concept's conditioning does not come from a CLIP Text Encode")
        source["inputs"]["text"] = args.concept
        concepts[0]["inputs"]["label"] = args.concept
    if typed is not None and typed.concepts:
        add_typed_concepts(prompt, args.prompt)


TYPED_NODE = "sega_typed"  # the SEGA Prompt node that --prompt's inline concepts add
SEGA_SAMPLERS = ("SEGAKSampler", "SEGAGuider", "SEGAApply")


def typed_concepts(text):
    """--prompt's text read as SEGA Prompt reads it (the prompt lines and any inline concepts, such as
    '+ glasses :6 @10-'); None without --prompt; WorkflowError naming the line and column of a mistake."""
    if text is None:
        return None
    from sega_core import SEGAValueError
    from sega_core.prompt_syntax import parse_prompt

    try:
        return parse_prompt(text, where="--prompt")
    except SEGAValueError as e:
        raise WorkflowError(str(e)) from None


def add_typed_concepts(prompt: dict, text: str) -> None:
    """A SEGA Prompt node holding --prompt's text, whose concepts follow the workflow's own at its one
    SEGA sampler (the concepts as the node makes them; its positive output is not used, the positive
    CLIP Text Encode gets the same prompt lines)."""
    samplers = [n for n in prompt.values() if n["class_type"] in SEGA_SAMPLERS]
    if len(samplers) != 1:
        raise WorkflowError(f"--prompt with concepts needs a workflow with one SEGA KSampler, SEGA Guider or SEGA "
                            f"Apply; this one has {len(samplers)}")
    sampler = samplers[0]
    encoder = source_of(prompt, sampler, "positive") or next(
        (n for n in prompt.values() if n["class_type"] == "CLIPTextEncode"), None)
    if encoder is None or not isinstance(encoder["inputs"].get("clip"), list):
        raise WorkflowError("--prompt with concepts: the workflow has no CLIP Text Encode to take the CLIP from")
    inputs = {"clip": encoder["inputs"]["clip"], "text": text}
    if sampler["inputs"].get("concepts") is not None:
        inputs["concepts"] = sampler["inputs"]["concepts"]
    prompt[TYPED_NODE] = {"class_type": "SEGAPrompt", "inputs": inputs}
    sampler["inputs"]["concepts"] = [TYPED_NODE, 1]


def typed_off(prompt: dict, typed) -> None:
    """In side_by_side's run without SEGA, --prompt's inline concepts at edit scale 0 too."""
    if typed is None or not typed.concepts:
        return
    import dataclasses

    from sega_core.prompt_syntax import render_prompt

    base = prompt.get(f"base:{TYPED_NODE}")
    if base is None:
        raise WorkflowError("--prompt with concepts needs a workflow whose SEGA sampler takes SEGA Concepts")
    off = dataclasses.replace(typed, concepts=tuple(dataclasses.replace(c, scale=0.0) for c in typed.concepts))
    base["inputs"]["text"] = render_prompt(off)


# run_sega.py's options that only a workflow run uses, and those that only a photo edit uses
WORKFLOW_ONLY = ("workflow", "prompt", "cfg")
PHOTO_ONLY = ("skip", "source", "source_guidance", "combination", "reconstruction")


def photo_graph():
    """nodes/photo_graph.py (plain dicts, no ComfyUI import), loaded on its own."""
    spec = importlib.util.spec_from_file_location("sega_photo_graph", PACK_ROOT / "nodes" / "photo_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image_size(path: Path) -> tuple:
    """(width, height) of an image file; OSError when it is not one."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def photo_size(w: int, h: int, size) -> tuple | None:
    """(width, height) with the longer side `size` pixels, the aspect kept, both multiples of 8 (the
    VAE's); None (the photo as it is) without a size."""
    if size is None:
        return None
    scale = size / max(w, h)
    return tuple(max(16, int(round(v * scale / 8)) * 8) for v in (w, h))


def run_photo(args, photo: Path) -> int:
    """--image: invert the photo once, reconstruct it and edit it, save the three side by side."""
    import folder_paths

    # LoadImage reads the photo where it is: this process's input folder is the photo's folder
    folder_paths.set_input_directory(str(photo.parent))
    concept = {"text": args.concept}
    for name in ("edit_scale", "direction", "warmup", "threshold"):
        if getattr(args, name) is not None:
            concept[name] = getattr(args, name)
    settings = {name: getattr(args, name) for name in ("steps", "skip", "seed", "source", "source_guidance",
                                                      "combination", "reconstruction")
                if getattr(args, name) is not None}
    scale = photo_size(*image_size(photo), args.size)
    prompt = photo_graph().photo_edit_prompt(args.checkpoint_name, photo.name, [concept], uncond=args.negative or "",
                                             filename_prefix="sega_photo", scale=scale, **settings)
    try:
        outputs = execute_prompt(prompt)
    except PromptError as e:  # a node refused the photo or a setting: its message, without the traceback
        print(f"{photo.name}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    image = outputs["save"]["images"][0]
    result = Path(folder_paths.get_output_directory()) / image.get("subfolder", "") / image["filename"]
    direction = "removed" if args.direction == "remove" else "added"
    print(f"{photo.name}: the photo (left), its reconstruction (middle) and the edit with '{args.concept}' "
          f"{direction} (right): {result}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a checkpoint in ComfyUI's models/checkpoints (an SD 1.x model fits "
                                        "the default workflow)")
    p.add_argument("--tiny", action="store_true", help="smoke test: a generated random-weight SD1.5 model "
                                                       "(the image is noise; it checks that everything runs)")
    p.add_argument("--workflow", default=str(DEFAULT_WORKFLOW),
                   help="a workflow saved by ComfyUI (UI format) with SEGA Concepts and one Save Image "
                        "(default: the pack's example 01, 'glasses' added to a portrait)")
    p.add_argument("--image", metavar="PHOTO",
                   help="edit this photo instead of running a workflow: it is inverted (SEGA Invert Photo) and "
                        "edited with --concept (SEGA Photo Edit); the photo, its reconstruction and its edit are "
                        "written side by side")
    p.add_argument("--comfyui", help="the ComfyUI folder (default: $COMFYUI_PATH, else $HOME/ComfyUI, else the "
                                      "ComfyUI whose custom_nodes/ holds this pack)")
    p.add_argument("--prompt", help="the positive prompt's text (default: the workflow's); it may hold concepts "
                                    "as SEGA Prompt reads them, one per line after the prompt ('+ hat :6 @10-', "
                                    "'- cars'), added after the workflow's")
    p.add_argument("--negative", help="the negative prompt's text (with --image: the uncond the concepts are "
                                      "measured against, default empty as in LEDITS++)")
    p.add_argument("--concept", help="the concept's text (workflows with one SEGA Concept; needed with --image)")
    p.add_argument("--direction", choices=["add", "remove"])
    p.add_argument("--edit-scale", type=float)
    p.add_argument("--warmup", type=int, help="steps before the concept acts (with --image default 0, LEDITS++'s)")
    p.add_argument("--threshold", type=float, help="the concept's threshold (0.9 keeps the strongest 10%%)")
    p.add_argument("--steps", type=int, help="sampler steps (with --image: inversion steps, default 30)")
    p.add_argument("--cfg", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--size", type=int, help="width and height of the empty latent image, in pixels (with --image: "
                                            "the photo is scaled to this longer side, default its own size)")
    p.add_argument("--skip", type=float, help="--image: the share of the noisiest steps dropped, in [0, 1) "
                                              "(default 0.15)")
    p.add_argument("--source", help="--image: a prompt describing the photo (LEDITS++'s source prompt)")
    p.add_argument("--source-guidance", type=float, help="--image: guidance towards --source (default 3.5)")
    p.add_argument("--combination", choices=["ledits", "sega"], help="--image: how concepts combine (default ledits)")
    p.add_argument("--reconstruction", choices=["exact", "as diffusers"],
                   help="--image: exact (default) lands on the photo's latent; 'as diffusers' on the x0-prediction")
    p.add_argument("--output-dir", help="where the image goes (default: ComfyUI's output folder)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    given = {a.dest for a in p._actions if getattr(args, a.dest, None) not in (None, a.default)}
    photo = None
    if args.image:
        photo = Path(args.image).expanduser().resolve()
        unused = [name for name in WORKFLOW_ONLY if name in given]
        if unused:
            print(f"--image edits a photo without a workflow: --{unused[0].replace('_', '-')} is not used "
                  f"(describe the photo with --source).", file=sys.stderr)
            return 2
        if not args.concept:
            print("--image needs --concept TEXT: the concept to add to the photo (or remove, with --direction "
                  "remove).", file=sys.stderr)
            return 2
        try:
            image_size(photo)
        except OSError as e:  # no such file, or not an image (PIL's UnidentifiedImageError)
            print(f"cannot read the photo {args.image}: {e}", file=sys.stderr)
            return 2
        if args.skip is not None and not 0.0 <= args.skip < 1.0:
            print(f"--skip must be in [0, 1) (0.15 drops the noisiest 15%), got {args.skip}", file=sys.stderr)
            return 2
    else:
        unused = [name for name in PHOTO_ONLY if name in given]
        if unused:
            print(f"--{unused[0].replace('_', '-')} is an option of a photo edit: add --image PHOTO.", file=sys.stderr)
            return 2

    try:
        root = find_comfyui(args.comfyui)
    except HostError as e:
        print(e, file=sys.stderr)
        return 2
    if root is None:
        print("ComfyUI not found: run the copy in ComfyUI/custom_nodes/, set COMFYUI_PATH, or pass --comfyui PATH.",
              file=sys.stderr)
        return 2
    prepare_host(root)
    import folder_paths

    if args.output_dir:
        folder_paths.set_output_directory(str(Path(args.output_dir).resolve()))

    if args.tiny:
        ckpt_path = tiny_checkpoint()
        folder_paths.add_model_folder_path("checkpoints", str(ckpt_path.parent))
        args.checkpoint_name = ckpt_path.name
        # a quick run: the tiny model's images are noise whatever the settings
        args.steps = 8 if args.steps is None else args.steps
        if photo is None:
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
    if photo is not None:
        init_nodes()
        return run_photo(args, photo)
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
        typed = typed_concepts(args.prompt)
        typed_off(prompt, typed)
    except WorkflowError as e:
        print(f"{Path(args.workflow).name}: {e}", file=sys.stderr)
        return 2
    outputs = execute_prompt(prompt)
    image = outputs["sega_save"]["images"][0]
    result = Path(folder_paths.get_output_directory()) / image.get("subfolder", "") / image["filename"]
    labels = [n["inputs"].get("label") or "a concept" for nid, n in prompt.items()
              if n["class_type"] == "SEGAConcept" and not nid.startswith("base:")]
    labels += [c.text for c in (typed.concepts if typed is not None else ())]
    print(f"{Path(args.workflow).name}: without SEGA (left) and with SEGA ({', '.join(labels)}) (right): {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
