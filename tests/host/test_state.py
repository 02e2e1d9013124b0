"""Faults and state: an interrupted run, the same seed twice, two samplers in one graph, and a queue
of different prompts leave nothing behind that changes a later image."""
from __future__ import annotations

import pytest
import torch

from comfy_host import PromptExecutionError, run_prompt, saved_images  # first: it readies ComfyUI's imports
from sega_graphs import Queue, add_concept, add_ksampler, add_sega_ksampler, add_stack, graph, save
from sega_testlib import apply_sega, concept, cond, pack_module, sample, tiny_sd15_model

import comfy.model_management  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.utils  # noqa: E402

STEPS = 3


def _sega_wrappers(model) -> int:
    key = pack_module("nodes.patch").KEY
    return sum(len(model.get_wrappers(kind, key)) for kind in (
        comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE,
        comfy.patcher_extension.WrappersMP.CALC_COND_BATCH))


def _post_cfg_patches(model) -> int:
    return sum(hasattr(f, "sega_patch") for f in model.model_options.get("sampler_post_cfg_function", []))


def _interrupt_at(step: int):
    """A step callback that interrupts the run as ComfyUI's progress hook does: the UI's interrupt
    sets the flag, the hook raises at the next step."""
    def callback(i, *args):
        if i == step:
            comfy.model_management.interrupt_current_processing()
        comfy.model_management.throw_exception_if_processing_interrupted()
    return callback


@pytest.fixture(scope="module")
def models():
    """Two models with the same weights: one to interrupt, one that never saw an interrupted run."""
    return tiny_sd15_model(), tiny_sd15_model()


@pytest.mark.parametrize("sampler", ["heun"])  # two model calls a step: the step clock is interrupted too
def test_interrupted_run_leaves_no_state(models, sampler):
    model, pristine = models
    pos, neg, c1, c2 = cond(1), cond(2), cond(3), cond(4)
    concepts = [concept(c1, warmup=0), concept(c2, warmup=1, reverse=True)]
    m = apply_sega(model, concepts, momentum_scale=0.5)
    latent = torch.zeros(1, 4, 4, 4)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        comfy.sample.sample(m, comfy.sample.prepare_noise(latent, 3), STEPS, 7.5, sampler, "normal", pos, neg,
                            latent, seed=3, callback=_interrupt_at(STEPS // 2), disable_pbar=True)
    assert not comfy.model_management.processing_interrupted()
    # nothing of the run is left on the model: no run state, one SEGA patch on the patched model, none on its base
    run_key = pack_module("nodes.patch").RUN_KEY
    assert run_key not in m.model_options and run_key not in model.model_options
    assert (_sega_wrappers(m), _post_cfg_patches(m)) == (3, 1)
    assert (_sega_wrappers(model), _post_cfg_patches(model)) == (0, 0)
    again = sample(m, pos, neg, steps=STEPS, sampler=sampler, size=4, seed=3)
    fresh = sample(apply_sega(pristine, concepts, momentum_scale=0.5), pos, neg, steps=STEPS,
                   sampler=sampler, size=4, seed=3)
    assert torch.equal(again, fresh)
    assert (again - sample(model, pos, neg, steps=STEPS, sampler=sampler, size=4, seed=3)).abs().max() > 1e-3


# -- whole prompts --------------------------------------------------------------------------

def _two_concepts(g, label="glasses"):
    return add_stack(g, "stack", [add_concept(g, "c1", "glasses", label=label),
                                  add_concept(g, "c2", "beard", direction="remove", warmup=1, edit_scale=10.0)])


def test_same_seed_twice_gives_the_same_image(ckpt):
    """Two runs of one prompt, each loading everything afresh, decode to the same image bit for bit."""
    def prompt():
        g = graph(ckpt)
        g["apply"] = {"class_type": "SEGAApply", "inputs": {"model": ["ckpt", 0], "concepts": _two_concepts(g),
                                                             "momentum_scale": 0.1, "momentum_beta": 0.4}}
        add_ksampler(g, "sampler", model=["apply", 0], seed=11)
        g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}}
        g["image"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "sega-seed"}}
        return g

    first, second = (saved_images(run_prompt(prompt()), "image") for _ in range(2))
    assert len(first) == len(second) == 1
    assert first[0].std() > 1  # an image, not a flat one
    assert (first[0] == second[0]).all()


def _shared_model_graph(ckpt, which, label):
    """SEGA Apply's model shared by two KSamplers (different seeds, samplers and step counts)."""
    g = graph(ckpt)
    g["apply"] = {"class_type": "SEGAApply", "inputs": {"model": ["ckpt", 0], "concepts": _two_concepts(g, label),
                                                         "momentum_scale": 0.3, "momentum_beta": 0.4}}
    if "k1" in which:
        save(g, "out1", add_ksampler(g, "k1", model=["apply", 0], seed=1))
    if "k2" in which:
        save(g, "out2", add_ksampler(g, "k2", model=["apply", 0], seed=2, steps=2, sampler_name="dpmpp_2s_ancestral"))
    if "s3" in which:
        save(g, "out3", add_sega_ksampler(g, "s3", ["stack", 0], seed=3, cfg=5.0))
    return g


@pytest.fixture(scope="module")
def queue(ckpt):
    """One queue for this module's prompts, as a server has: the loaded checkpoint is shared by all."""
    return Queue()


def test_two_samplers_in_one_graph_do_not_share_state(ckpt, queue):
    """Each sampler of a graph gives what it gives in a graph of its own. Every run names a concept
    differently (the label only shows in messages), so that the cache cannot hand one run's samples
    to another: every sampler executes."""
    alone = {}
    for i, name in enumerate(("k1", "k2", "s3")):
        alone[name] = queue.run(_shared_model_graph(ckpt, (name,), f"alone-{i}"))[f"out{name[1]}"]
        assert name in queue.executed
    together = queue.run(_shared_model_graph(ckpt, ("k1", "k2", "s3"), "together"))
    assert {"k1", "k2", "s3"} <= set(queue.executed)
    for name in alone:
        assert torch.equal(together[f"out{name[1]}"], alone[name]), name
    assert not torch.equal(together["out1"], together["out2"])


@pytest.fixture()
def nan_latent(comfy_nodes):
    import safetensors.torch

    import folder_paths

    samples = torch.zeros(1, 4, 4, 4)
    samples[0, 2, 1, 1] = float("nan")
    safetensors.torch.save_file({"latent_tensor": samples, "latent_format_version_0": torch.tensor([])},
                                folder_paths.get_input_directory() + "/sega-state-nan.latent")
    return "sega-state-nan.latent"


def test_a_queue_of_prompts_leaves_no_state(ckpt, queue, nan_latent, monkeypatch):
    """Different prompts (concepts, counts, samplers, ways to use SEGA), a failing one and an
    interrupted one, run through one queue that keeps the loaded checkpoint: the first prompt,
    run again at the end, gives the same latent as at the start."""

    def first(label):
        g = graph(ckpt)
        return save(g, "out", add_sega_ksampler(g, "sampler", _two_concepts(g, label), seed=5))

    start = queue.run(first("start"))["out"]

    g = graph(ckpt, batch=2)
    g["apply"] = {"class_type": "SEGAApply", "inputs": {
        "model": ["ckpt", 0], "concepts": add_concept(g, "c", "hat", direction="remove", threshold=0.9),
        "momentum_scale": 0.5, "momentum_beta": 0.6}}
    queue.run(save(g, "out", add_ksampler(g, "sampler", model=["apply", 0], sampler_name="dpmpp_2m", seed=9)))

    g = graph(ckpt)
    g["guider"] = {"class_type": "SEGAGuider", "inputs": {
        "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": 4.0,
        "concepts": add_stack(g, "three", [add_concept(g, f"t{i}", t) for i, t in enumerate(("sun", "sea", "sky"))]),
        "momentum_scale": 0.2, "momentum_beta": 0.4}}
    g["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 2}}
    g["select"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "heun"}}
    g["sigmas"] = {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": "karras",
                                                              "steps": 3, "denoise": 1.0}}
    g["sampler"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["select", 0], "sigmas": ["sigmas", 0],
        "latent_image": ["latent", 0]}}
    queue.run(save(g, "out", ["sampler", 0]))

    # a prompt that fails while sampling (SEGA's check of the run), then one interrupted half-way
    g = graph(ckpt)
    g["latent"] = {"class_type": "LoadLatent", "inputs": {"latent": nan_latent}}
    g["apply"] = {"class_type": "SEGAApply", "inputs": {"model": ["ckpt", 0], "concepts": _two_concepts(g, "nan"),
                                                         "momentum_scale": 0.1, "momentum_beta": 0.4}}
    with pytest.raises(PromptExecutionError, match=r"SEGA Apply: sampling with SEGA gave NaN or inf"):
        queue.run(save(g, "out", add_ksampler(g, "sampler", model=["apply", 0], denoise=0.5)))

    def hook(value, total, *args, **kwargs):  # ComfyUI's progress hook, with the UI's interrupt at step 2
        if value >= 2:
            comfy.model_management.interrupt_current_processing()
        comfy.model_management.throw_exception_if_processing_interrupted()

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    # newer ComfyUI calls the hook at most every 0.1 s: every step here
    monkeypatch.setattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", 0.0, raising=False)
    g = graph(ckpt)
    with pytest.raises(PromptExecutionError, match=r"interrupted at node sampler"):
        queue.run(save(g, "out", add_sega_ksampler(g, "sampler", _two_concepts(g, "interrupted"), seed=5,
                                                   steps=6)))
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)

    end = queue.run(first("end"))
    assert "sampler" in queue.executed and "ckpt" not in queue.executed  # sampled again, same loaded model
    assert torch.equal(end["out"], start)
