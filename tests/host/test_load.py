"""Load: 100 SEGA prompts through a real ComfyUI server's POST /prompt.

One `main.py --cpu` server on 127.0.0.1 (tests/host/comfy_server.py) with the tiny SD1.5
checkpoint gets 100 API-format prompts built from ten templates (the three ways to run SEGA,
1 to 4 concepts, several samplers and schedulers, batches of 1 to 3, 32x32 pixels, 2 steps),
each submission with a new seed. The first ten (one per template) warm the server up and are
awaited one by one; the other ninety (nine per template, template by template) are queued at
once. Checked:
  - every prompt is accepted and finishes with status success, its latent (SaveLatent) and, for
    the templates that decode, one image per batch item, all fetched through /history and /view;
  - the first and the last submission of each template give the same latents (bit for bit)
    and images (pixel for pixel) as ComfyUI's executor in this process for the same graphs and
    seeds (run_prompt, no cache; the 20 graphs side by side in one prompt);
  - the server's resident memory (VmRSS, child processes included) grows by less than 200 MB
    from after the warm-up to the end.
The figures (prompts, wall time, prompts/s, memory) are printed and logged, and kept as test
properties (pytest --junitxml). Both processes run torch on one thread, so the comparison can be
exact.
"""
from __future__ import annotations

import logging
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_host import run_prompt, saved_images
from comfy_server import PACK_NAME, Server, host_dir, prepare_server_dir
from harness import pack

log = logging.getLogger(__name__)

N_PROMPTS = 100
WARMUP = 10
SIZE = 32  # pixels: a 4x4 latent
MAX_GROWTH_MB = 200
SERVER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CONCEPT_TEXTS = ["glasses", "beard", "smile", "red hat"]

# (way, concepts, sampler, scheduler, batch, steps, decode): every prompt saves its latent
# (SaveLatent); those with `decode` also save the decoded images (VAEDecode, SaveImage).
TEMPLATES = [
    ("ksampler", 1, "euler", "normal", 1, 2, True),
    ("apply", 1, "uni_pc", "normal", 3, 2, False),
    ("guider", 1, "euler", "normal", 1, 2, True),
    ("ksampler", 2, "heun", "karras", 1, 2, False),
    ("ksampler", 2, "euler_ancestral", "simple", 2, 2, False),
    ("guider", 2, "dpmpp_2m", "sgm_uniform", 2, 2, False),
    ("ksampler", 3, "dpmpp_2m", "normal", 1, 2, False),
    ("apply", 3, "heun", "normal", 1, 2, False),
    ("apply", 4, "dpmpp_2m_sde", "karras", 1, 2, False),
    ("guider", 4, "euler_ancestral", "normal", 1, 2, False),
]


def concept_inputs(t: int, i: int) -> dict:
    """Concept i of template t: strong settings (the random-weight model's predictions differ
    little between prompts), both directions, warm-up 0 or 1. Concept i's text is the same in
    every template, so the server's cache keeps the text encodings, as it would for a user."""
    return pack.concept_inputs(edit_scale=6.0 + 3 * i, direction="remove" if (t + i) % 3 == 2 else "add",
                               threshold=0.5 + 0.1 * (i % 4), warmup=(t + i) % 2, label=CONCEPT_TEXTS[i])


def add_template(g: dict, ckpt: str, t: int, seed: int, p: str = "") -> None:
    """Template t's nodes, ids prefixed with `p`, into `g` (CheckpointLoaderSimple and the
    prompt encodings are shared: node ids without the prefix)."""
    way, n, sampler, scheduler, batch, steps, decode = TEMPLATES[t]
    g.update({
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a portrait photo of a man", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        p + "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": batch}},
    })
    for i in range(n):
        settings = concept_inputs(t, i)
        g[f"ctext{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": settings["label"], "clip": ["ckpt", 1]}}
        g[f"{p}concept{i}"] = {"class_type": "SEGAConcept", "inputs": {"conditioning": [f"ctext{i}", 0], **settings}}
    g[p + "stack"] = {"class_type": "SEGAConceptStack",
                      "inputs": {f"concepts.concepts{i}": [f"{p}concept{i}", 0] for i in range(n)}}
    momentum = {"momentum_scale": 0.1 * (t % 3), "momentum_beta": 0.4}
    sampling = {"seed": seed, "steps": steps, "cfg": 7.5, "sampler_name": sampler, "scheduler": scheduler,
                "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": [p + "latent", 0], "denoise": 1.0}
    stack = [p + "stack", 0]
    if way == "ksampler":
        g[p + "sampler"] = {"class_type": "SEGAKSampler",
                            "inputs": {"model": ["ckpt", 0], "concepts": stack, **sampling, **momentum}}
    elif way == "apply":
        g[p + "apply"] = {"class_type": "SEGAApply", "inputs": {"model": ["ckpt", 0], "concepts": stack, **momentum}}
        g[p + "sampler"] = {"class_type": "KSampler", "inputs": {"model": [p + "apply", 0], **sampling}}
    else:
        g[p + "guider"] = {"class_type": "SEGAGuider", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "concepts": stack,
            "cfg": 7.5, **momentum}}
        g[p + "noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
        g[p + "select"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}}
        g[p + "sigmas"] = {"class_type": "BasicScheduler", "inputs": {
            "model": ["ckpt", 0], "scheduler": scheduler, "steps": steps, "denoise": 1.0}}
        g[p + "sampler"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": [p + "noise", 0], "guider": [p + "guider", 0], "sampler": [p + "select", 0],
            "sigmas": [p + "sigmas", 0], "latent_image": [p + "latent", 0]}}
    g[p + "save_latent"] = {"class_type": "SaveLatent",
                            "inputs": {"samples": [p + "sampler", 0], "filename_prefix": f"sega-load/t{t}"}}
    if decode:
        g[p + "decode"] = {"class_type": "VAEDecode", "inputs": {"samples": [p + "sampler", 0], "vae": ["ckpt", 2]}}
        g[p + "save"] = {"class_type": "SaveImage",
                         "inputs": {"images": [p + "decode", 0], "filename_prefix": f"sega-load/t{t}"}}


def build_prompt(ckpt: str, t: int, seed: int) -> dict:
    g: dict = {}
    add_template(g, ckpt, t, seed)
    return g


def submissions(ckpt: str) -> list[tuple[int, int, dict]]:
    """(template, seed, prompt) for each of the N_PROMPTS submissions: the warm-up runs each
    template once, then each template comes in a run of submissions, as a user tries seeds on a
    graph before moving to the next one. Seeds never repeat."""
    per = (N_PROMPTS - WARMUP) // len(TEMPLATES)
    order = list(range(WARMUP)) + [min(j // per, len(TEMPLATES) - 1) for j in range(N_PROMPTS - WARMUP)]
    return [(t, 1_000_003 * k + 17, build_prompt(ckpt, t, 1_000_003 * k + 17)) for k, t in enumerate(order)]


def load_latent(data: bytes) -> torch.Tensor:
    from safetensors.torch import load

    return load(data)["latent_tensor"]


def to_rgb(im) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def finished(server: Server, prompt_id: str, t: int) -> dict:
    """Wait for one prompt; require success, its latent and one image per batch item (templates
    that decode); return {"latent": tensor, "images": [HxWx3 uint8]} as fetched through /view."""
    entry = server.wait_history(prompt_id, timeout=60)
    status = entry["status"]
    errors = [m for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
    assert status["status_str"] == "success" and status["completed"] and not errors, (t, status)
    batch, decode = TEMPLATES[t][4], TEMPLATES[t][6]
    (item,) = entry["outputs"]["save_latent"]["latents"]
    q = urllib.parse.urlencode({k: item[k] for k in ("filename", "subfolder", "type")})
    latent = load_latent(server.get(f"/view?{q}")[2])
    assert latent.shape == (batch, 4, SIZE // 8, SIZE // 8) and torch.isfinite(latent).all(), (t, latent.shape)
    images = [to_rgb(im) for im in server.images(entry, "save")] if decode else []
    assert len(images) == (batch if decode else 0), (t, len(images))
    return {"latent": latent, "images": images}


def in_process(ckpt: str, which: list[tuple[int, int]]) -> dict:
    """The same templates and seeds through ComfyUI's executor in this process, as one prompt
    (the checkpoint is loaded and each text encoded once): {(t, seed): result as finished() gives}."""
    import folder_paths

    g: dict = {}
    for j, (t, seed) in enumerate(which):
        add_template(g, ckpt, t, seed, p=f"r{j}.")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outputs = run_prompt(g)
    finally:
        torch.set_num_threads(threads)
    out = {}
    for j, (t, seed) in enumerate(which):
        (item,) = outputs[f"r{j}.save_latent"]["latents"]
        path = Path(folder_paths.get_output_directory(), item["subfolder"], item["filename"])
        images = [np.asarray(a)[..., :3] for a in saved_images(outputs, f"r{j}.save")]
        out[(t, seed)] = {"latent": load_latent(path.read_bytes()), "images": images}
    return out


@pytest.fixture()
def server(tiny_sd15_checkpoint, tmp_path):
    """A server being started (not waited for: the test does other work meanwhile)."""
    base = tmp_path / "comfyui-base"
    prepare_server_dir(base, tiny_sd15_checkpoint.path)
    srv = Server(host_dir(), base, env=SERVER_ENV)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.timeout(300)
def test_hundred_prompts_through_the_server(server, comfy_nodes, tiny_sd15_checkpoint, record_property, capsys):
    assert comfy_nodes.pack_imported, comfy_nodes.pack_error
    subs = submissions(tiny_sd15_checkpoint.name)
    # compared with this process: the first and the last submission of each template, computed
    # while the server starts
    checked = sorted(set(range(WARMUP)) | set({t: k for k, (t, _, _) in enumerate(subs)}.values()))
    t0 = time.monotonic()
    expected = in_process(tiny_sd15_checkpoint.name, [subs[k][:2] for k in checked])
    reference_s = time.monotonic() - t0
    server.wait_ready(timeout=120)
    results: dict[int, dict] = {}

    start = time.monotonic()
    for k in range(WARMUP):  # one per template, awaited one by one
        t, _, prompt = subs[k]
        results[k] = finished(server, server.queue(prompt), t)
    warm_s = time.monotonic() - start
    rss_warm = server.rss()
    assert rss_warm > 200 * 1024 * 1024, f"{rss_warm} bytes: not the memory of a server with torch and a model"

    t0 = time.monotonic()
    ids = [server.queue(prompt) for _, _, prompt in subs[WARMUP:]]
    rss_peak = rss_warm
    for k, prompt_id in enumerate(ids, start=WARMUP):
        results[k] = finished(server, prompt_id, subs[k][0])
        rss_peak = max(rss_peak, server.rss())
    load_s = time.monotonic() - t0
    rss_end = server.rss()
    total_s = time.monotonic() - start
    assert len(results) == N_PROMPTS
    # nothing raised in the pack, no node failed (the server's log; v0.8.0 logs an unrelated
    # sqlalchemy traceback when its in-memory database's pool is finalised)
    text = server.log()
    assert f"custom_nodes/{PACK_NAME}/" not in text and "Exception during processing" not in text, text[-4000:]

    for k in checked:
        t, seed, _ = subs[k]
        want, got = expected[(t, seed)], results[k]
        where = f"prompt {k} (template {t}: {TEMPLATES[t]}, seed {seed})"
        assert torch.equal(want["latent"], got["latent"]), (
            f"{where}: the server's latent differs from the in-process one by up to "
            f"{(want['latent'] - got['latent']).abs().max().item():.3g}")
        assert len(want["images"]) == len(got["images"]), where
        for e, g in zip(want["images"], got["images"]):
            assert np.array_equal(e, g), f"{where}: the server's image differs from the in-process one"
    # the seed reaches every way: a template's latents differ between its submissions
    for t in range(len(TEMPLATES)):
        mine = [results[k]["latent"] for k, (u, _, _) in enumerate(subs) if u == t]
        assert len(mine) >= 2 and not any(torch.equal(mine[0], x) for x in mine[1:]), TEMPLATES[t]

    mb = 1 / (1024 * 1024)
    growth = (rss_end - rss_warm) * mb
    figures = {"prompts": N_PROMPTS, "images": sum(len(v["images"]) for v in results.values()),
               "latents": sum(v["latent"].shape[0] for v in results.values()),
               "wall_s": round(total_s, 1), "warmup_s": round(warm_s, 1), "queued_s": round(load_s, 1),
               "prompts_per_s": round((N_PROMPTS - WARMUP) / load_s, 2),
               "rss_after_warmup_mb": round(rss_warm * mb, 1), "rss_peak_mb": round(rss_peak * mb, 1),
               "rss_end_mb": round(rss_end * mb, 1), "rss_growth_mb": round(growth, 1),
               "compared_in_process": len(checked), "in_process_s": round(reference_s, 1)}
    for name, value in figures.items():
        record_property(name, value)
    line = "SEGA load: " + ", ".join(f"{k}={v}" for k, v in figures.items())
    log.info(line)
    with capsys.disabled():
        print("\n" + line)
    assert growth < MAX_GROWTH_MB, line
