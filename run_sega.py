"""Run a SEGA workflow through ComfyUI without the browser.

From the ComfyUI folder, with ComfyUI's Python:

    python custom_nodes/comfyui-sega/run_sega.py --checkpoint v1-5-pruned-emaonly.safetensors
    python custom_nodes/comfyui-sega/run_sega.py --tiny      # smoke test on a generated tiny model

It loads ComfyUI's nodes in this process, runs a shipped example workflow (--workflow: any saved
workflow with SEGA Concepts and one Save Image) once without SEGA (every concept at edit_scale 0,
which samples exactly as without SEGA) and once with it, on the same seed, and writes both images
side by side into ComfyUI's output folder. Finding ComfyUI, running the prompt and the tiny model
are harness/'s, shared with the tests and the benchmarks.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from harness.host import HostError, find_comfyui, init_nodes, prepare_host
from harness.prompts import execute_prompt
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
    for option, kind in (("edit_scale", "edit_scale"), ("direction", "direction"), ("warmup", "warmup")):
        set_all(kind, getattr(args, option), ("SEGAConcept",))
    for role in ("positive", "negative"):
        text = getattr(args, "prompt" if role == "positive" else "negative")
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a checkpoint in ComfyUI's models/checkpoints (an SD 1.x model fits "
                                        "the default workflow)")
    p.add_argument("--tiny", action="store_true", help="smoke test: a generated random-weight SD1.5 model "
                                                       "(the image is noise; it checks that everything runs)")
    p.add_argument("--workflow", default=str(DEFAULT_WORKFLOW),
                   help="a workflow saved by ComfyUI (UI format) with SEGA Concepts and one Save Image "
                        "(default: the pack's example 01, 'glasses' added to a portrait)")
    p.add_argument("--comfyui", help="the ComfyUI folder (default: $COMFYUI_PATH, else $HOME/ComfyUI, else the "
                                      "ComfyUI whose custom_nodes/ holds this pack)")
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
