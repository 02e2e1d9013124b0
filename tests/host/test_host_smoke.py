"""A plain text-to-image workflow on the tiny SD1.5 checkpoint, through ComfyUI's executor."""
import numpy as np
import pytest

from comfy_host import run_prompt, saved_images


def txt2img_prompt(ckpt_name: str, width: int = 64, height: int = 64, steps: int = 4) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "sega_smoke"}},
    }


# SaveImage casts float pixels to uint8: NaN or inf would show up only as this numpy warning.
@pytest.mark.filterwarnings("error:invalid value encountered:RuntimeWarning")
def test_txt2img_on_tiny_sd15(comfy_nodes, tiny_sd15_checkpoint):
    outputs = run_prompt(txt2img_prompt(tiny_sd15_checkpoint.name))
    images = saved_images(outputs, "7")
    assert len(images) == 1
    image = images[0]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert np.isfinite(image.astype(np.float32)).all()
    assert image.std() > 0, "a constant image: the decode produced no signal"
