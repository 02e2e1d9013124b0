"""The API prompt of a photo edit with stock ComfyUI nodes and the SEGA photo nodes, for the headless
runner (run_sega.py --image) and the tests: the photo, its reconstruction and its edit side by side.

Builds plain dicts; nothing in this module imports ComfyUI.
"""
from __future__ import annotations

from typing import Optional, Sequence

# LEDITS++'s defaults for a concept (its edit_warmup_steps is 0, SEGA's paper uses 10)
LEDITS_CONCEPT = {"edit_scale": 5.0, "direction": "add", "threshold": 0.9, "warmup": 0, "cooldown": 10000,
                  "weight": 1.0}


def photo_edit_prompt(checkpoint: str, image: str, concepts: Sequence[dict], steps: int = 30, skip: float = 0.15,
                      seed: int = 0, source: Optional[str] = None, source_guidance: float = 3.5,
                      combination: str = "ledits", reconstruction: str = "exact", uncond: str = "",
                      filename_prefix: str = "sega_photo", scale: Optional[tuple] = None) -> dict:
    """An API prompt that inverts `image` (a file in ComfyUI's input folder) once and saves one image:
    the photo | its reconstruction (no concept) | its edit, left to right, 8 px apart.

    concepts: one dict per concept, {"text": ..., plus any SEGA Concept input (edit_scale, direction,
    threshold, warmup, cooldown, weight, label)}; LEDITS++'s defaults (warmup 0) fill the rest.
    uncond: the text the edit measures concepts against (LEDITS++'s "" or a negative prompt).
    scale: (width, height) in pixels to resize the photo to first (ImageScale), or None to use it as it is.
    """
    if not concepts:
        raise ValueError("photo_edit_prompt: give at least one concept (e.g. {'text': 'glasses'}).")
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "photo": {"class_type": "LoadImage", "inputs": {"image": image}},
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["photo", 0], "vae": ["ckpt", 2]}},
        "uncond": {"class_type": "CLIPTextEncode", "inputs": {"text": uncond, "clip": ["ckpt", 1]}},
        "invert": {"class_type": "SEGAInvertPhoto",
                   "inputs": {"model": ["ckpt", 0], "latent": ["encode", 0], "uncond": ["uncond", 0],
                              "steps": int(steps), "skip": float(skip), "seed": int(seed)}},
    }
    photo = ["photo", 0]
    if scale is not None:
        g["scaled"] = {"class_type": "ImageScale", "inputs": {"image": photo, "upscale_method": "area",
                                                             "width": int(scale[0]), "height": int(scale[1]),
                                                             "crop": "disabled"}}
        photo = ["scaled", 0]
        g["encode"]["inputs"]["pixels"] = photo
    if source:
        g["source"] = {"class_type": "CLIPTextEncode", "inputs": {"text": source, "clip": ["ckpt", 1]}}
        g["invert"]["inputs"].update(source=["source", 0], source_guidance=float(source_guidance))
    chain = None
    for i, c in enumerate(concepts):
        c = dict(c)
        text = c.pop("text")
        g[f"concept_text{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}}
        inputs = dict(LEDITS_CONCEPT, label=text)
        inputs.update(c)
        inputs["conditioning"] = [f"concept_text{i}", 0]
        if chain is not None:
            inputs["concepts"] = chain
        g[f"concept{i}"] = {"class_type": "SEGAConcept", "inputs": inputs}
        chain = [f"concept{i}", 0]
    for name, extra in (("reconstruction", {}), ("edit", {"concepts": chain})):
        g[name] = {"class_type": "SEGAPhotoEdit",
                   "inputs": {"model": ["ckpt", 0], "inversion": ["invert", 0], "combination": combination,
                              "reconstruction": reconstruction, **extra}}
        g[f"{name}_image"] = {"class_type": "VAEDecode", "inputs": {"samples": [name, 0], "vae": ["ckpt", 2]}}
    stitch = {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"}
    g["stitch1"] = {"class_type": "ImageStitch",
                    "inputs": {"image1": photo, "image2": ["reconstruction_image", 0], **stitch}}
    g["stitch2"] = {"class_type": "ImageStitch",
                    "inputs": {"image1": ["stitch1", 0], "image2": ["edit_image", 0], **stitch}}
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["stitch2", 0], "filename_prefix": filename_prefix}}
    return g
