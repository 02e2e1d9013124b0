"""Bad and extreme input: each case gives a clear error (naming the node, the input and the fix) or
a documented, finite result; never a crash of the host, never a silent NaN.

Numeric cases run the tiny in-memory model through SEGA's hooks; cases about nodes and wiring run
whole prompts through ComfyUI's validation and executor. Cases tested elsewhere (a 1280-wide
concept, 3 prompts for 2 images, threshold 1.0, edit_scale 0, cfg 1, a NaN latent at denoise 0.5,
SEGA KSampler with no concepts) are in test_hooks.py, test_nodes.py and test_workflows.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from comfy_host import PromptExecutionError, PromptValidationError, run_prompt
from harness.pack import concept_inputs
from sega_graphs import Queue, add_concept, add_ksampler, add_sega_ksampler, add_stack, graph, save
from sega_testlib import RowCounter, apply_sega, concept, cond, pack_module, sample, tiny_sd15_model

STEPS = 2
SIZE = 4  # a 4x4 latent


@pytest.fixture(scope="module")
def model():
    return tiny_sd15_model()


@pytest.fixture(scope="module")
def plain(model):
    """Plain sampling (no SEGA) by sampling settings, computed once each."""
    done = {}

    def get(**kw):
        kw.setdefault("size", SIZE)
        key = tuple(sorted(kw.items()))
        if key not in done:
            done[key] = sample(model, cond(1), cond(2), **kw)
        return done[key]
    return get


@dataclasses.dataclass(frozen=True)
class Case:
    concepts: tuple = ({},)  # settings of each concept; `width`, `batch` and `conditioning` shape its text
    sampling: tuple = ()  # (name, value) pairs for sample()
    momentum: tuple = (0.1, 0.4)  # momentum_scale, momentum_beta
    error: str | None = None  # the SEGAError expected, as a regex; else the result must be finite
    vs_plain: str | None = None  # "differs": SEGA edits; "equal": bit-identical to plain; "close": no edit


def case(id, *concepts, error=None, vs_plain=None, momentum=(0.1, 0.4), **sampling):
    concepts = concepts or ({},)
    return pytest.param(Case(concepts, tuple(sorted(sampling.items())), momentum, error, vs_plain), id=id)


NUMERIC = [
    case("concept-encoded-for-SDXL-2048-wide", dict(width=2048, label="xl"),
         error=r"SEGA Concept 'xl': its conditioning is 2048 wide but the positive prompt's is 768.*"
               r"Encode the concept with the CLIP of the model"),
    case("concept-batch-2-latent-batch-3", dict(batch=2),
         error=r"SEGA Concept #1: its conditioning holds 2 prompts but the latent batch has 3 images", batch=3),
    case("concept-batch-1-latent-batch-3", dict(warmup=0), vs_plain="differs", batch=3),
    case("concept-with-empty-conditioning", dict(conditioning=[]),
         error=r"SEGA Concept #1: its conditioning input is empty; wire a CLIP Text Encode into it"),
    case("threshold-0", dict(threshold=0.0, warmup=0), vs_plain="differs"),
    case("threshold-0.999", dict(threshold=0.999, warmup=0), vs_plain="differs"),
    # the node refuses edit_scale above 100 (test_node_limits_are_checked); through the Python API
    # a large finite scale gives a large finite latent, and an overflow is an error
    case("edit-scale-1e6", dict(scale=1e6, warmup=0), vs_plain="differs"),
    case("edit-scale-1e30-overflows", dict(scale=1e30, warmup=0),
         error=r"SEGA Apply: sampling with SEGA gave NaN or inf .* lower the concepts' edit_scale"),
    case("all-weights-0", dict(weight=0.0, warmup=0), dict(weight=0.0), dict(weight=0.0, reverse=True),
         vs_plain="equal"),
    case("weight-negative-counts-as-0", dict(weight=-2.0, warmup=0), vs_plain="equal"),
    # with momentum on, the concept's rows are still computed (its momentum builds up), never applied
    case("warmup-past-the-last-step", dict(warmup=50), vs_plain="close"),
    case("cooldown-before-warmup-no-momentum", dict(warmup=2, cooldown=1), momentum=(0.0, 0.4), vs_plain="equal"),
    # the reference's behaviour: the momentum built before the cool-down still acts after the warm-up
    case("cooldown-before-warmup-with-momentum", dict(warmup=2, cooldown=1), momentum=(0.5, 0.4)),
    case("cfg-0", dict(warmup=0), vs_plain="differs", cfg=0.0),
    case("cfg-100", dict(warmup=0), vs_plain="differs", cfg=100.0),
    case("one-step", dict(warmup=0), vs_plain="differs", steps=1),
    case("one-step-default-warmup", dict(), vs_plain="close", steps=1),
    case("denoise-0.01", dict(warmup=0), denoise=0.01),
    case("momentum-scale-1-beta-0.999", dict(warmup=0), momentum=(1.0, 0.999), vs_plain="differs"),
    case("latent-2x2", dict(warmup=0), vs_plain="differs", size=2),
]


def _spec(i: int, settings: dict):
    settings = dict(settings)
    width, batch = settings.pop("width", 768), settings.pop("batch", 1)
    conditioning = settings.pop("conditioning", None)
    if conditioning is None:
        conditioning = cond(10 + i, width=width, batch=batch)
    return concept(conditioning, label=settings.pop("label", ""), **settings)


@pytest.mark.parametrize("c", NUMERIC)
def test_numeric_case(model, plain, c):
    errors = pack_module("nodes.errors")
    sampling = dict(c.sampling)
    sampling.setdefault("steps", STEPS)
    sampling.setdefault("size", SIZE)
    m = apply_sega(model, [_spec(i, s) for i, s in enumerate(c.concepts)], *c.momentum)
    if c.error:
        with pytest.raises(errors.SEGAError, match=c.error):
            sample(m, cond(1), cond(2), **sampling)
        return
    out = sample(m, cond(1), cond(2), **sampling)
    assert torch.isfinite(out).all()
    reference = plain(**sampling)
    if c.vs_plain == "equal":
        assert torch.equal(out, reference)
    elif c.vs_plain == "close":
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    elif c.vs_plain == "differs":
        assert (out - reference).abs().max() > 1e-3


def test_negative_edit_scale_is_the_other_direction(model):
    """Through the Python API a negative edit_scale flips the direction, as in the reference (the node
    refuses it: test_node_limits_are_checked)."""
    negative = sample(apply_sega(model, [_spec(0, dict(scale=-5.0, warmup=0))]), cond(1), cond(2), steps=STEPS,
                      size=SIZE)
    reverse = sample(apply_sega(model, [_spec(0, dict(scale=5.0, reverse=True, warmup=0))]), cond(1), cond(2),
                     steps=STEPS, size=SIZE)
    assert torch.equal(negative, reverse)


def test_thirty_concepts_in_one_model_call(model, plain):
    counter = RowCounter()
    specs = [_spec(i, dict(warmup=0, threshold=0.5, weight=1.0 / (i + 1))) for i in range(30)]
    out = sample(apply_sega(counter.attach(model), specs, momentum_scale=0.0), cond(1), cond(2), steps=2, size=4)
    assert torch.isfinite(out).all()
    assert counter.rows == [32, 32]  # positive, negative and 30 concepts in one call per step
    assert (out - plain(steps=2, size=4)).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_model(dtype):
    """A UNet in fp16 or bf16 (as ComfyUI runs it on GPUs; both also run on the CPU): SEGA's edit is
    computed on ComfyUI's float32 outputs, and the result is finite and edited."""
    half = tiny_sd15_model()
    half.model.diffusion_model.to(dtype)
    half.model.diffusion_model.dtype = dtype  # what BaseModel.get_dtype() reads to cast the input
    out = sample(apply_sega(half, [_spec(0, dict(warmup=0))]), cond(1), cond(2), steps=1, size=SIZE)
    assert torch.isfinite(out).all()
    assert (out - sample(half, cond(1), cond(2), steps=1, size=SIZE)).abs().max() > 1e-3


def test_sd15_concept_in_an_sdxl_model():
    from sega_testlib import sdxl_cond, tiny_sdxl_model

    errors = pack_module("nodes.errors")
    m = apply_sega(tiny_sdxl_model(), [concept(cond(3), label="sd15")])
    with pytest.raises(errors.SEGAError, match=r"SEGA Concept 'sd15': its conditioning is 768 wide but the "
                                               r"positive prompt's is 2048"):
        sample(m, sdxl_cond(1), sdxl_cond(2), steps=1, size=SIZE)


def _node_output(result):
    return (getattr(result, "result", None) or result.args)[0]


def test_concept_stack_with_thirty_slots_keeps_their_order(comfy_nodes):
    import nodes

    concept_node = nodes.NODE_CLASS_MAPPINGS["SEGAConcept"]
    stack = nodes.NODE_CLASS_MAPPINGS["SEGAConceptStack"]
    settings = concept_inputs()
    slots = {f"concepts{i}": _node_output(concept_node.execute(conditioning=cond(i), label=f"c{i}", **settings))
             for i in range(30)}
    out = _node_output(stack.execute(concepts=dict(reversed(list(slots.items())))))
    assert [s.label for s in out] == [f"c{i}" for i in range(30)]


# -- whole prompts --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def queue(ckpt):
    """The prompts of this module that run go through one queue: the checkpoint loads once."""
    return Queue()


def _one_concept_graph(ckpt, **settings):
    g = graph(ckpt)
    add_sega_ksampler(g, "sampler", add_concept(g, "c", "glasses", **settings))
    return save(g, "out", ["sampler", 0])


@pytest.mark.parametrize("node,name,value,message", [
    ("c", "edit_scale", -1.0, r"node c \(SEGAConcept\): Value -1.0 smaller than min of 0.0: edit_scale"),
    ("c", "edit_scale", 1e6, r"node c \(SEGAConcept\): Value 1000000.0 bigger than max of 100.0: edit_scale"),
    ("c", "weight", -1.0, r"node c \(SEGAConcept\): Value -1.0 smaller than min of 0.0: weight"),
    ("c", "warmup", -1, r"node c \(SEGAConcept\): Value -1 smaller than min of 0: warmup"),
    ("c", "direction", "sideways", r"node c \(SEGAConcept\): Value not in list: direction: 'sideways'"),
    ("c", "threshold", -0.1, r"node c \(SEGAConcept\): .*threshold must be in \[0, 1\)"),
    ("sampler", "momentum_beta", 1.0,
     r"node sampler \(SEGAKSampler\): Value 1.0 bigger than max of 0.999: momentum_beta"),
    ("sampler", "cfg", 101.0, r"node sampler \(SEGAKSampler\): Value 101.0 bigger than max of 100.0: cfg"),
], ids=lambda v: str(v))
def test_node_limits_are_checked(ckpt, node, name, value, message):
    """Out-of-range settings in a (shared) workflow are refused before anything runs."""
    g = _one_concept_graph(ckpt)
    g[node]["inputs"][name] = value
    with pytest.raises(PromptValidationError, match=message):
        run_prompt(g)


def test_empty_concept_stack_is_refused(ckpt):
    g = graph(ckpt)
    g["stack"] = {"class_type": "SEGAConceptStack", "inputs": {}}
    add_sega_ksampler(g, "sampler", ["stack", 0])
    # refused by validation where ComfyUI checks Autogrow's minimum (v0.33.0), else by the node
    with pytest.raises((PromptValidationError, PromptExecutionError),
                       match=r"node stack \(SEGAConceptStack\)(: Required input is missing: concepts0| failed: .*"
                             r"SEGA Concept Stack: nothing is connected to its concepts input)"):
        run_prompt(save(g, "out", ["sampler", 0]))


def test_concept_without_conditioning_is_refused(ckpt):
    g = _one_concept_graph(ckpt)
    del g["c"]["inputs"]["conditioning"]
    with pytest.raises(PromptValidationError, match=r"node c \(SEGAConcept\): Required input is missing: "
                                                    r"conditioning"):
        run_prompt(g)


def test_conditioning_wired_into_concepts_is_refused(ckpt):
    g = graph(ckpt)
    add_sega_ksampler(g, "sampler", ["pos", 0])
    with pytest.raises(PromptValidationError, match=r"node sampler \(SEGAKSampler\): Return type mismatch .*"
                                                    r"concepts.*CONDITIONING.*SEGA_CONCEPTS"):
        run_prompt(save(g, "out", ["sampler", 0]))


def test_no_concepts_in_apply_and_guider_is_plain_sampling(ckpt, queue):
    """SEGA Apply and SEGA Guider with nothing connected sample exactly as KSampler and CFGGuider."""
    g = graph(ckpt)
    add_ksampler(g, "plain")
    g["apply"] = {"class_type": "SEGAApply", "inputs": {"model": ["ckpt", 0], "momentum_scale": 0.1,
                                                         "momentum_beta": 0.4}}
    add_ksampler(g, "applied", model=["apply", 0])
    g["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}}
    g["select"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["sigmas"] = {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": "normal",
                                                              "steps": 3, "denoise": 1.0}}
    guiders = {"cfg_guider": "CFGGuider", "sega_guider": "SEGAGuider"}
    for name, cls in guiders.items():
        inputs = {"model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": 7.5}
        if cls == "SEGAGuider":
            inputs.update(momentum_scale=0.1, momentum_beta=0.4)
        g[name] = {"class_type": cls, "inputs": inputs}
        g[f"{name}_run"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": [name, 0], "sampler": ["select", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}}
    for name in ("plain", "applied", "cfg_guider_run", "sega_guider_run"):
        save(g, f"out_{name}", [name, 0])
    out = queue.run(g)
    assert torch.isfinite(out["out_plain"]).all()
    assert torch.equal(out["out_applied"], out["out_plain"])
    assert torch.equal(out["out_sega_guider_run"], out["out_cfg_guider_run"])


def test_all_weights_zero_in_a_prompt_is_plain_ksampler(ckpt, queue):
    g = graph(ckpt)
    stack = add_stack(g, "stack", [add_concept(g, "a", "glasses", weight=0.0),
                                   add_concept(g, "b", "beard", weight=0.0, direction="remove")])
    add_sega_ksampler(g, "sega", stack)
    add_ksampler(g, "plain")
    out = queue.run(save(save(g, "out_sega", ["sega", 0]), "out_plain", ["plain", 0]))
    assert torch.equal(out["out_sega"], out["out_plain"])


@pytest.fixture()
def nan_latent_file(comfy_nodes):
    import safetensors.torch

    import folder_paths

    samples = torch.zeros(1, 4, 4, 4)
    samples[0, 1, 2, 2] = float("nan")
    path = folder_paths.get_input_directory() + "/sega-nan.latent"
    safetensors.torch.save_file({"latent_tensor": samples, "latent_format_version_0": torch.tensor([])}, path)
    return "sega-nan.latent"


@pytest.mark.parametrize("with_concept", [False, True], ids=["no-concepts", "one-concept"])
def test_nan_in_the_input_latent_is_an_error(ckpt, queue, nan_latent_file, with_concept):
    """A .latent file holding NaN: an error naming SEGA KSampler's latent_image, concepts or not (with
    no concept acting the model is unpatched, so SEGA's own check of the run would not see it)."""
    g = graph(ckpt)
    g["latent"] = {"class_type": "LoadLatent", "inputs": {"latent": nan_latent_file}}
    add_sega_ksampler(g, "sampler", add_concept(g, "c", "glasses") if with_concept else None, denoise=0.5)
    with pytest.raises(PromptExecutionError, match=r"node sampler \(SEGAKSampler\).*SEGAError: SEGA KSampler: "
                                                   r"latent_image holds NaN or inf"):
        queue.run(save(g, "out", ["sampler", 0]))


@pytest.fixture(scope="module")
def shared_concept_runs(ckpt, queue):
    """One concept in two stacks, each stack in its own sampler, in one graph; and each sampler alone
    (with the node's largest threshold, 0.999, on the second concept).
    Each run names the concept differently (the label only shows in messages), so that the queue's
    cache cannot hand one run's samples to another: every sampler executes."""
    def run(which, label):
        g = graph(ckpt)
        c = add_concept(g, "c", "glasses", label=label)
        if "s1" in which:
            add_sega_ksampler(g, "s1", add_stack(g, "x", [c, add_concept(g, "d", "beard", direction="remove",
                                                                         threshold=0.999)]),
                              seed=1)
            save(g, "out1", ["s1", 0])
        if "s2" in which:
            add_sega_ksampler(g, "s2", add_stack(g, "y", [c]), seed=2, sampler_name="heun")
            save(g, "out2", ["s2", 0])
        out = queue.run(g)
        assert set(which) <= set(queue.executed)
        return out

    return run(("s1", "s2"), "both"), run(("s1",), "first")["out1"], run(("s2",), "second")["out2"]


def test_same_concept_in_two_stacks(shared_concept_runs):
    both, alone1, _ = shared_concept_runs
    assert torch.isfinite(both["out1"]).all()
    assert torch.equal(both["out1"], alone1)


def test_concept_wired_into_two_samplers(shared_concept_runs):
    both, _, alone2 = shared_concept_runs
    assert torch.equal(both["out2"], alone2)
    assert not torch.equal(both["out1"], both["out2"])


def test_model_giving_nan_with_no_concepts_is_an_error(comfy_nodes, model):
    """A model that gives NaN (fp16 overflow, broken weights) through SEGA KSampler with no concept acting:
    the node reports it instead of passing a NaN latent on."""
    import nodes

    broken = model.clone()
    broken.set_model_unet_function_wrapper(
        lambda apply, args: apply(args["input"], args["timestep"], **args["c"]) * float("nan"))
    sampler = nodes.NODE_CLASS_MAPPINGS["SEGAKSampler"]
    with pytest.raises(ValueError, match=r"SEGA KSampler: sampling gave NaN or inf"):  # SEGAError
        sampler.execute(model=broken, seed=0, steps=1, cfg=7.5, sampler_name="euler", scheduler="normal",
                        positive=cond(1), negative=cond(2), latent_image={"samples": torch.zeros(1, 4, SIZE, SIZE)},
                        denoise=1.0, momentum_scale=0.1, momentum_beta=0.4)


@pytest.mark.parametrize("settings,momentum,message", [
    (dict(threshold=1.0), (0.1, 0.4), r"SEGA KSampler: SEGA Concept 'x': threshold must be in \[0, 1\)"),
    (dict(scale=float("nan")), (0.1, 0.4), r"SEGA KSampler: SEGA Concept 'x': edit_scale must be a finite number"),
    (dict(cooldown=-1), (0.1, 0.4), r"SEGA KSampler: SEGA Concept 'x': cooldown must be >= 0"),
    (dict(), (0.1, 1.5), r"SEGA KSampler: momentum_beta must be in \[0, 1\], got 1.5"),
], ids=["threshold", "edit_scale", "cooldown", "momentum_beta"])
def test_settings_are_validated_once_with_one_message(model, monkeypatch, settings, momentum, message):
    """Through the Python API a bad setting is refused when the sampler node builds its plan, once per
    concept, with a message naming the node, the concept and the setting; the SEGA Concept node's
    check before running gives the same words for threshold."""
    concepts, errors = pack_module("sega_core.concepts"), pack_module("nodes.errors")
    checked = []
    real = concepts.Concept.validate
    monkeypatch.setattr(concepts.Concept, "validate", lambda self, *a: checked.append(self) or real(self, *a))
    specs = [concept(cond(3), label="y"), concept(cond(4), label="x", **settings)]
    with pytest.raises(errors.SEGAError, match=message) as refused:
        pack_module("nodes.patch").apply_sega(model, specs, *momentum, node="SEGA KSampler")
    assert checked == ([] if "momentum" in message else [s.concept for s in specs])
    if "threshold" in settings:
        said = pack_module("nodes.concept_nodes").SEGAConcept.validate_inputs(threshold=1.0)
        assert said == "SEGA Concept: " + str(refused.value).split(": ", 2)[2]


def test_good_settings_are_checked_once(model, monkeypatch):
    concepts = pack_module("sega_core.concepts")
    checked = []
    real = concepts.Concept.validate
    monkeypatch.setattr(concepts.Concept, "validate", lambda self, *a: checked.append(self) or real(self, *a))
    specs = [concept(cond(3), label="y"), concept(cond(4), warmup=2)]
    pack_module("nodes.patch").apply_sega(model, specs, 0.1, 0.4)
    assert checked == [s.concept for s in specs]


@pytest.mark.parametrize("x,y", [(64, 0), (0, 32), (256, 256)], ids=["right-of", "below", "far-outside"])
def test_concept_area_outside_the_latent(ckpt, queue, x, y):
    """ConditioningSetArea placing a concept outside the 32x32 image (a 4x4 latent): an error naming
    the concept and its area, where ComfyUI's own evaluation stops with `narrow(): length must be
    non-negative`; ComfyUI's error dialog names the error comfyui_sega.SEGAError (a short, stable
    type name, not the pack's install path)."""
    g = graph(ckpt)
    ref = add_concept(g, "c", "glasses")
    g["area"] = {"class_type": "ConditioningSetArea",
                 "inputs": {"conditioning": ["c_text", 0], "width": 64, "height": 64, "x": x, "y": y, "strength": 1.0}}
    g["c"]["inputs"]["conditioning"] = ["area", 0]
    add_sega_ksampler(g, "sampler", ref)
    with pytest.raises(PromptExecutionError,
                       match=rf"node sampler \(SEGAKSampler\) failed: comfyui_sega\.SEGAError: SEGA KSampler: "
                             rf"SEGA Concept 'glasses': its area \(ConditioningSetArea\) lies outside the image: it "
                             rf"starts at y={y // 8}, x={x // 8} \(in latent cells, pixels / 8\) but the latent is "
                             rf"4 high and 4 wide"):
        queue.run(save(g, "out", ["sampler", 0]))


def test_concept_area_at_the_latent_edge_runs(ckpt, queue):
    """An area that starts inside the latent and runs past its edge is cut to the latent, as ComfyUI
    does for the prompts: it samples, and the concept edits."""
    g = graph(ckpt)
    ref = add_concept(g, "c", "glasses")
    g["area"] = {"class_type": "ConditioningSetArea",
                 "inputs": {"conditioning": ["c_text", 0], "width": 64, "height": 64, "x": 24, "y": 0, "strength": 1.0}}
    g["c"]["inputs"]["conditioning"] = ["area", 0]
    add_sega_ksampler(g, "sampler", ref)
    add_ksampler(g, "plain")
    out = queue.run(save(save(g, "out", ["sampler", 0]), "plain_out", ["plain", 0]))
    assert torch.isfinite(out["out"]).all()
    assert (out["out"] - out["plain_out"]).abs().max() > 1e-4


def test_error_type_is_the_packs_short_name():
    """ComfyUI names an exception by module and qualname (execution.full_type_name)."""
    import execution

    errors = pack_module("nodes.errors")
    assert execution.full_type_name(errors.SEGAError) == "comfyui_sega.SEGAError"
