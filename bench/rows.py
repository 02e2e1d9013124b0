"""Model rows per image: the pack against the reference's (2 + N) rows per model evaluation.

Counts the rows of every UNet call through ComfyUI's model function wrapper while the real
sampler runs the tiny SD1.5 checkpoint (8x8 latent, cfg 7.5, 50 steps) patched by SEGA Apply.
The reference (diffusers' SemanticStableDiffusionPipeline) computes uncond, prompt and every
concept at every model evaluation: (2 + N) x evaluations (x steps for one-call samplers; heun
makes 2 calls per step but the last). Plain CFG computes 2 x evaluations.

Targets (exact counts, so checked here; the script exits 1 if one fails):
  - pack rows == the expected count: 2 + the concepts inside their window at each evaluation
    (a concept is needed from its warm-up, or from step 0 when momentum is on, until its cool-down);
  - pack rows <= reference rows, always;
  - pack rows < reference rows whenever a concept's window ends before the last step, or
    momentum is off and a warm-up is set.
"""
from __future__ import annotations

import sys

import _common
import _comfy
from harness.pack import CONCEPT_DEFAULTS, NEVER

STEPS = 50
WARMUP = CONCEPT_DEFAULTS["warmup"]  # the SEGA Concept node's default
CONFIGS = [
    # name, sampler, momentum_scale, concept settings
    ("defaults (warm-up 10, momentum 0.1)", "euler", 0.1, [{}]),
    ("warm-up 10, momentum 0", "euler", 0.0, [{}]),
    ("cool-down 30 of 50", "euler", 0.1, [{"cooldown": 30}]),
    ("3 concepts: windows 0-50, 5-25, 20-40", "euler", 0.1,
     [{"warmup": 0}, {"warmup": 5, "cooldown": 25}, {"warmup": 20, "cooldown": 40}]),
    ("3 concepts: windows 0-50, 5-25, 20-40, momentum 0", "euler", 0.0,
     [{"warmup": 0}, {"warmup": 5, "cooldown": 25}, {"warmup": 20, "cooldown": 40}]),
    ("8 concepts, warm-up 10, momentum 0", "dpmpp_2m", 0.0, [{}] * 8),
    ("heun, defaults", "heun", 0.1, [{}]),
    ("heun, cool-down 30 of 50, momentum 0", "heun", 0.0, [{"cooldown": 30}]),
]


def evaluations_per_step(sampler: str, steps: int) -> list:
    """Model evaluations of each sampler step (heun: 2, but 1 on the last step, which ends at sigma 0)."""
    if sampler == "heun":
        return [2] * (steps - 1) + [1]
    return [1] * steps


def needed(settings: dict, step: int, momentum_scale: float) -> bool:
    """Whether a concept's prediction can change the image at this step (the definition, not the pack's code)."""
    warmup, cooldown = settings.get("warmup", WARMUP), settings.get("cooldown", NEVER)
    return step < cooldown and (step >= warmup or momentum_scale != 0.0)


def must_save(settings_list: list, momentum_scale: float, steps: int) -> bool:
    ends_early = any(s.get("cooldown", NEVER) < steps for s in settings_list)
    cold_skipped = momentum_scale == 0.0 and any(s.get("warmup", WARMUP) > 0 for s in settings_list)
    return ends_early or cold_skipped


def main(argv=None) -> int:
    args = _common.parser(__doc__).parse_args(argv)
    _common.setup(args)
    _comfy.start()
    model, clip = _comfy.load_tiny()
    pos, neg = _comfy.encode(clip, "a photo of a man"), _comfy.encode(clip, "blurry")
    texts = ["glasses", "a hat", "a beard", "smiling", "a red scarf", "oil painting", "snow", "sunset"]
    conds = [_comfy.encode(clip, t) for t in texts]

    rows_out, failures = [], []
    for name, sampler, momentum, settings in CONFIGS:
        n = len(settings)
        counter = _comfy.RowCounter()
        patched = _comfy.sega(counter.attach(model), _comfy.concepts(conds[:n], settings), momentum)
        _comfy.sample(patched, pos, neg, STEPS, size=8, sampler=sampler)
        per_step = evaluations_per_step(sampler, STEPS)
        evals = sum(per_step)
        plain, reference, pack = 2 * evals, (2 + n) * evals, sum(counter.rows)
        expected = sum(k * (2 + sum(needed(s, i, momentum) for s in settings)) for i, k in enumerate(per_step))
        strict = must_save(settings, momentum, STEPS)
        ok = len(counter.rows) == evals and pack == expected and pack <= reference and (pack < reference or not strict)
        if not ok:
            failures.append(name)
        target = "< reference" if strict else "<= reference"
        rows_out.append([name, sampler, n, evals, plain, reference, pack, expected,
                         f"{pack / reference:.3f}", f"{pack / plain:.3f}", target, "PASS" if ok else "FAIL"])

    body = _common.table(
        ["configuration (50 steps)", "sampler", "N", "model calls", "plain CFG rows", "reference rows (2+N)",
         "pack rows", "expected", "pack / reference", "pack / plain CFG", "target", "result"], rows_out)
    notes = ("Rows per image (batch 1), counted through ComfyUI's model function wrapper. The expected count "
             "follows from the settings alone: a concept's rows are needed from step 0 (momentum on) or from its "
             "warm-up (momentum off) until its cool-down. Counts are exact: a FAIL exits with status 1.")
    _common.finish(args, _common.section("1. Model rows per image", body, notes))
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
