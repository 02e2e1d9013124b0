"""Run a SEGA workflow through ComfyUI without the browser.

From the ComfyUI folder, with ComfyUI's Python:

    python custom_nodes/comfyui-sega/run_sega.py --checkpoint v1-5-pruned-emaonly.safetensors
    python custom_nodes/comfyui-sega/run_sega.py --tiny      # smoke test on a generated tiny model

It loads ComfyUI's nodes in this process, samples the same seed without and with SEGA (one
concept added by default), and writes both images side by side into ComfyUI's output folder.
"""
from __future__ import annotations

import argparse
import asyncio
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

def sega_prompt(ckpt: str, prompt: str, negative: str, concept: str, direction: str, edit_scale: float,
                warmup: int, steps: int, cfg: float, seed: int, size: int, prefix: str) -> dict:
    """API-format prompt: the same seed without SEGA (KSampler) and with it (SEGA KSampler),
    stitched side by side (ImageStitch) into one saved image."""
    sampler = {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
               "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0,
               "model": ["ckpt", 0]}
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["ckpt", 1]}},
        "ctext": {"class_type": "CLIPTextEncode", "inputs": {"text": concept, "clip": ["ckpt", 1]}},
        "concept": {"class_type": "SEGAConcept", "inputs": {
            "conditioning": ["ctext", 0], "edit_scale": edit_scale, "direction": direction, "threshold": 0.9,
            "warmup": warmup, "cooldown": 10000, "weight": 1.0, "label": concept}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "plain": {"class_type": "KSampler", "inputs": dict(sampler)},
        "sega": {"class_type": "SEGAKSampler", "inputs": dict(sampler, concepts=["concept", 0],
                                                                momentum_scale=0.1, momentum_beta=0.4)},
        "decode_plain": {"class_type": "VAEDecode", "inputs": {"samples": ["plain", 0], "vae": ["ckpt", 2]}},
        "decode_sega": {"class_type": "VAEDecode", "inputs": {"samples": ["sega", 0], "vae": ["ckpt", 2]}},
        "stitch": {"class_type": "ImageStitch", "inputs": {
            "image1": ["decode_plain", 0], "image2": ["decode_sega", 0], "direction": "right",
            "match_image_size": True, "spacing_width": 8, "spacing_color": "white"}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["stitch", 0], "filename_prefix": prefix}},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a checkpoint in ComfyUI's models/checkpoints (an SD 1.x model fits "
                                        "the defaults)")
    p.add_argument("--tiny", action="store_true", help="smoke test: a generated random-weight SD1.5 model "
                                                       "(the image is noise; it checks that everything runs)")
    p.add_argument("--comfyui", help="the ComfyUI folder (default: found from this file or the current folder)")
    p.add_argument("--prompt", default="a photo of a man in a park, portrait")
    p.add_argument("--negative", default="blurry, low quality")
    p.add_argument("--concept", default="glasses")
    p.add_argument("--direction", choices=["add", "remove"], default="add")
    p.add_argument("--edit-scale", type=float, default=5.0)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512)
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
        ckpt = ckpt_path.name
        if "--steps" not in (argv or sys.argv):
            args.steps, args.warmup = 8, 2
        if "--size" not in (argv or sys.argv):
            args.size = 64
    else:
        available = folder_paths.get_filename_list("checkpoints")
        if not args.checkpoint or args.checkpoint not in available:
            which = f"'{args.checkpoint}' is not" if args.checkpoint else "no --checkpoint"
            print(f"{which} among ComfyUI's checkpoints ({root / 'models' / 'checkpoints'}).", file=sys.stderr)
            print("Put a checkpoint there (an SD 1.5 model fits the defaults) and pass --checkpoint NAME, "
                  "or run with --tiny for a smoke test on a generated model.", file=sys.stderr)
            if available:
                print("Available: " + ", ".join(available), file=sys.stderr)
            return 2
        ckpt = args.checkpoint
    init_nodes()
    prefix = "sega_run"
    outputs = execute_prompt(sega_prompt(ckpt, args.prompt, args.negative, args.concept, args.direction,
                                         args.edit_scale, args.warmup, args.steps, args.cfg, args.seed,
                                         args.size, prefix))
    image = outputs["save"]["images"][0]
    result = Path(folder_paths.get_output_directory()) / image.get("subfolder", "") / image["filename"]
    print(f"without SEGA (left) and with '{args.concept}' {'added' if args.direction == 'add' else 'removed'} "
          f"(right): {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
