"""sega_core against the reference: diffusers' SemanticStableDiffusionPipeline, run offline.

The pipeline is built from harness/reference.py's stand-ins, so nothing is downloaded:
  - a tokenizer that maps each known string ("" for uncond, "prompt<j>", "concept<k>") to one id;
  - a text encoder whose embedding of a prompt is its id (so the UNet can tell rows apart);
  - a UNet that ignores the latents and returns, for step i and each row of the batch it is
    given, the prediction chosen by the test: uncond u[i, s], text t[i, s] or concept e[i, k, s]
    for sample s; it also checks that every row sits where the pipeline's chunking expects it;
  - a real DDIMScheduler built from its default config, whose `step` is wrapped to record the
    noise prediction (`model_output`) the pipeline hands it at every step;
  - output_type="latent", no VAE, no safety checker.
Each step's recorded noise prediction is compared with u + (s_g (t - u) + edit) from sega_step.

Batch > 1: the concepts are given as strings (`editing_prompt`), never as precomputed
`editing_prompt_embeddings`. With strings the reference lays the concept rows out per prompt in
the same order as the latents (prompt-major, images-per-prompt minor), so every sample's concept
prediction is well defined: sample s of concept k gets e[i, k, s]. With precomputed embeddings
and several prompts the reference repeats the rows by batch and then splits them by concept, so
samples get the wrong concepts; the stand-in UNet would catch that (it asserts chunk == 2 + k).
"""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
from hypothesis import given, settings, strategies as st, HealthCheck  # noqa: E402

from harness.reference import PredictionUNet, concept_kwargs, pipeline, record_steps  # noqa: E402
from sega_core import Concept  # noqa: E402


@pytest.fixture(scope="session")
def reference():
    pipe = pipeline(PredictionUNet())
    recorded = record_steps(pipe.scheduler)

    def run(case, u, t, e):
        """The reference's per-step noise predictions (T, B, C, H, W) for the given predictions."""
        assert len(case.shape) == 3, "the reference handles 4-D latents only"
        c, h, w = case.shape
        pipe.unet.config.in_channels = c
        pipe.unet.set(u, t, e, case.images_per_prompt)
        recorded.clear()
        cs = case.concepts
        prompt = "prompt0" if case.prompts == 1 else [f"prompt{j}" for j in range(case.prompts)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe(prompt=prompt, height=8 * h, width=8 * w, num_inference_steps=case.steps,
                 guidance_scale=case.guidance_scale, num_images_per_prompt=case.images_per_prompt,
                 latents=torch.zeros(case.batch, c, h, w), output_type="latent",
                 editing_prompt=[f"concept{k}" for k in range(len(cs))],
                 edit_momentum_scale=case.momentum_scale, edit_mom_beta=case.momentum_beta,
                 **concept_kwargs(cs, case.scalars))
        assert pipe.unet.calls == case.steps and len(recorded) == case.steps
        return torch.stack(recorded)

    return run


def check(helpers, reference, case):
    u, t, e = helpers.make_preds(case)
    ref = reference(case, u, t, e)
    ours, edits = helpers.run_ours(case, u, t, e)
    helpers.assert_matches_reference(case, ours, edits, ref)
    # The transcription the other tests use as an oracle agrees with the pipeline, NaNs included.
    port = helpers.run_port(case, u, t, e)
    assert torch.equal(torch.isnan(port), torch.isnan(ref))
    torch.testing.assert_close(port.nan_to_num(), ref.nan_to_num(), rtol=0, atol=1e-5)
    return ref, ours


C = Concept
CASES = {
    # the paper's defaults, warm-up 2 of 6 steps
    "1-concept-defaults": dict(concepts=[C(warmup=2)]),
    # every setting per concept; steps 1-2 have only concept 0 warmed up; concept 1 cools down at 5
    "2-concepts-partial-warmup": dict(concepts=[
        C(scale=3.0, threshold=0.8, warmup=1, cooldown=None, weight=1.0, reverse=False),
        C(scale=7.0, threshold=0.95, warmup=3, cooldown=5, weight=0.5, reverse=True)], steps=7),
    # all concepts cool down before the end; the momentum (0.5, 0.8) goes on and is still applied
    "3-concepts-all-cooled-momentum-continues": dict(concepts=[
        C(scale=4.0, threshold=0.9, warmup=0, cooldown=2),
        C(scale=6.0, threshold=0.7, warmup=1, cooldown=3, reverse=True),
        C(scale=2.0, threshold=0.5, warmup=1, cooldown=4, weight=2.0)],
        steps=8, momentum_scale=0.5, momentum_beta=0.8),
    # thresholds 0 ... 0.99, staggered warm-ups, mixed cool-downs, reverse, weights
    "4-concepts-every-setting": dict(concepts=[
        C(scale=1.0, threshold=0.0, warmup=0, cooldown=None, weight=1.0, reverse=True),
        C(scale=3.0, threshold=0.5, warmup=1, cooldown=6, weight=0.5, reverse=False),
        C(scale=5.0, threshold=0.9, warmup=2, cooldown=5, weight=2.0, reverse=True),
        C(scale=10.0, threshold=0.99, warmup=3, cooldown=None, weight=0.75, reverse=False)],
        steps=8, momentum_beta=0.8, shape=(4, 4, 4)),
    "reverse-only": dict(concepts=[C(scale=5.0, threshold=0.9, warmup=1, reverse=True)]),
    # batch > 1: two prompts x two images, per-sample predictions differ
    "batch-2-prompts-x-2-images": dict(concepts=[
        C(scale=5.0, threshold=0.9, warmup=1), C(scale=4.0, threshold=0.8, warmup=2, cooldown=5, weight=1.5,
                                                 reverse=True)],
        prompts=2, images_per_prompt=2),
    "batch-1-prompt-x-3-images": dict(concepts=[C(warmup=0), C(scale=2.0, threshold=0.6, warmup=2)],
                                      images_per_prompt=3),
    "batch-2-prompts": dict(concepts=[C(warmup=1, threshold=0.75)], prompts=2, steps=4),
    # momentum off: concepts before their warm-up are skipped (plan.rows) and nothing changes
    "no-momentum-skips-cold-concepts": dict(concepts=[C(warmup=0), C(warmup=4, reverse=True)], momentum_scale=0.0),
    # a scale-0 concept is skipped but its weight still normalises the partly warmed-up step
    "scale-0-weight-normalises": dict(concepts=[
        C(scale=0.0, warmup=0, weight=3.0), C(scale=5.0, warmup=0), C(scale=5.0, warmup=3)]),
    # a warmed-up concept that has cooled down counts with weight 0 in the normalisation (steps 2-4)
    "cooled-down-not-normalised": dict(concepts=[
        C(scale=5.0, warmup=0, cooldown=2, weight=1.0), C(scale=3.0, warmup=0, weight=1.0),
        C(scale=4.0, warmup=5, reverse=True)], steps=7),
    # negative weights count as 0 in both branches
    "negative-weight": dict(concepts=[
        C(scale=5.0, warmup=0, weight=-1.0), C(scale=5.0, warmup=2), C(scale=3.0, warmup=0, weight=2.0)]),
    # a concept that cools down before it warms up: never applied, but counts as warmed up later
    "cooldown-before-warmup": dict(concepts=[C(warmup=4, cooldown=2), C(warmup=1)], steps=7),
    # all concepts cooled down from the start: only the (zero) momentum remains
    "cooldown-0": dict(concepts=[C(warmup=0, cooldown=0), C(warmup=1, cooldown=0)], steps=4),
    # shared settings passed to the reference as scalars (cooldown None = never)
    "scalars-shared": dict(concepts=[C(scale=6.0, threshold=0.85, warmup=2)] * 3, scalars=True),
    "scalars-shared-cooldown": dict(concepts=[C(scale=4.0, threshold=0.5, warmup=1, cooldown=4, weight=0.5)] * 2,
                                    scalars=True),
    # latents with 16 channels (SD3/Flux-sized), lower guidance scale
    "16-channels": dict(concepts=[C(warmup=1), C(scale=3.0, warmup=0, reverse=True)], shape=(16, 2, 3),
                        guidance_scale=3.0),
    "1x1-spatial": dict(concepts=[C(warmup=1), C(threshold=0.0, warmup=0)], shape=(4, 1, 1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(helpers, reference, name):
    check(helpers, reference, helpers.Case(**CASES[name]))


@pytest.mark.parametrize("momentum_scale,momentum_beta", list(itertools.product([0.0, 0.1, 0.5], [0.4, 0.8])))
def test_momentum_matches_reference(helpers, reference, momentum_scale, momentum_beta):
    case = helpers.Case(concepts=[
        C(scale=5.0, threshold=0.9, warmup=1, cooldown=6),
        C(scale=3.0, threshold=0.8, warmup=3, cooldown=None, weight=0.5, reverse=True)],
        steps=8, momentum_scale=momentum_scale, momentum_beta=momentum_beta, prompts=1, images_per_prompt=2)
    check(helpers, reference, case)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_concept_count_matches_reference(helpers, reference, n):
    concepts = [C(scale=2.0 + k, threshold=[0.9, 0.0, 0.5, 0.99][k], warmup=k, cooldown=[None, 5, 4, None][k],
                  weight=[1.0, 0.5, 2.0, 1.0][k], reverse=bool(k % 2)) for k in range(n)]
    check(helpers, reference, helpers.Case(concepts=concepts, steps=7, seed=n))


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_settings_match_reference(helpers, reference, data):
    check(helpers, reference, helpers.draw_case(data))


def test_reference_nan_where_ours_gives_no_edit(helpers, reference):
    """The real pipeline turns a step NaN when the warmed-up concepts all have weight 0; ours adds nothing."""
    case = helpers.Case(concepts=[C(warmup=0, weight=0.0), C(warmup=3)], steps=5)
    assert helpers.nan_steps(case) == [0, 1, 2]
    u, t, e = helpers.make_preds(case)
    ref = reference(case, u, t, e)
    assert torch.isnan(ref[:3]).all() and torch.isfinite(ref[3:]).all()
    ours, edits = helpers.run_ours(case, u, t, e)
    assert torch.isfinite(ours).all()
    for i in range(3):
        assert edits[i] is None or not edits[i].any()
        torch.testing.assert_close(ours[i], u[i] + case.guidance_scale * (t[i] - u[i]), rtol=0, atol=0)
    helpers.assert_matches_reference(case, ours, edits, ref)


def test_momentum_applied_after_every_concept_cooled_down(helpers, reference):
    """After the last cool-down the concepts add nothing, but the momentum still moves the image."""
    case = helpers.Case(**CASES["3-concepts-all-cooled-momentum-continues"])
    ref, ours = check(helpers, reference, case)
    u, t, _ = helpers.make_preds(case)
    for i in range(4, case.steps):  # every concept cooled down from step 4 on
        cfg = u[i] + case.guidance_scale * (t[i] - u[i])
        assert (ref[i] - cfg).abs().max() > 1e-3 and (ours[i] - cfg).abs().max() > 1e-3
