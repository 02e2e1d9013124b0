"""LEDITS++ photo edits (issue 12): the pack inside ComfyUI against diffusers' LEDITS++ on the same UNet.

Both sides run the same random UNet weights (harness.shared_unet: ComfyUI's tiny SD1.5 UNet, 18.7 M
parameters, loaded by ComfyUI's own loader and by diffusers' UNet2DConditionModel) on the CPU, with
the same conditioning (fixed random embeddings; the pipeline's tokenizer and text encoder are
stand-ins that return them) and the same photo latent, seed, steps and skip. The pack runs its nodes
as a workflow would: SEGA Concept, SEGA Invert Photo, SEGA Photo Edit (combination "ledits",
reconstruction "as diffusers", diffusers' own, unless a case says "exact") through ComfyUI's guider and sampler; diffusers runs
LEditsPPPipelineStableDiffusion's invert() and __call__() (output_type "latent").

  1. Model rows, counted in both (ComfyUI's model function wrapper; a hook on diffusers' UNet):
     per inverted step the pack needs 1 row (2 with a source prompt, in one call), per edit step
     1 + the concepts acting at that step (2 + ... with a source prompt and reconstruction "exact":
     the edit keeps the inversion's source-guided prediction so that it still reconstructs the
     photo), less the base rows of the first edit step, which the inversion computed already.
     diffusers computes every concept at every edit step. Exact counts: a FAIL exits with status 1.
  2. Time of invert + edit, pack against diffusers, runs interleaved (medians):
     time ratio = median(pack) / median(diffusers); target <= 1.0 on the CPU. The CPU-time ratio
     (this process's CPU seconds, medians) is shown beside it: steadier when other jobs share the machine.
     Also the largest difference between the two edited latents (a check that both did the same work).
  3. Memory of the inversion the pack keeps (SEGA Invert Photo's output) against the pipeline's,
     per step, and computed for SDXL at 1024x1024 (4x128x128 float32 latent), 50 steps.
"""
from __future__ import annotations

import sys
import time

import _common
import _comfy

SKIP = 0.15
SEED = 7
SOURCE = "a photo of a street"
CONCEPTS = ["glasses", "a red car", "snow"]
CASES = [
    # name, source prompt, reconstruction, per concept: SEGA Concept settings (LEDITS++'s warm-up 0,
    # threshold 0.9)
    ("1 concept", None, "as diffusers", [{}]),
    ("source prompt, 1 concept", SOURCE, "as diffusers", [{}]),
    ("source prompt, 1 concept, exact", SOURCE, "exact", [{}]),
    ("2 concepts", None, "as diffusers", [{}, {"direction": "remove"}]),
    ("2 concepts, one acting in steps 2-5", None, "as diffusers", [{}, {"warmup": 2, "cooldown": 6}]),
]
LEDITS_CONCEPT = {"edit_scale": 5.0, "direction": "add", "threshold": 0.9, "warmup": 0}
SDXL_LATENT = (1, 4, 128, 128)  # 1024x1024
SDXL_STEPS = 50


def acting(settings: list, step: int) -> int:
    """Concepts acting at `step` (LEDITS++: warm-up <= step < cool-down, scale not 0)."""
    return sum(1 for s in settings if s.get("warmup", 0) <= step < s.get("cooldown", 10 ** 9))


def expected_rows(source, reconstruction: str, settings: list, steps: int) -> tuple:
    """(pack inversion rows, pack edit rows, diffusers inversion rows, diffusers edit rows) per image."""
    inverted = 2 if source else 1
    base = 2 if source and reconstruction == "exact" else 1  # the edit's base rows
    edit = sum(base + acting(settings, k) for k in range(steps)) - base  # step 0: the inversion's own
    return inverted * steps, edit, inverted * steps, (1 + len(settings)) * steps


def with_cpu(fn, out: list):
    """`fn`, appending the CPU seconds of this process that each call takes to `out` (less sensitive
    than wall time to other jobs on a shared machine; one torch thread)."""
    def run():
        start = time.process_time()
        fn()
        out.append(time.process_time() - start)
    return run


def mib(n: float) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("--size", type=int, help="latent side (default 16 = 128 px, --quick 8)")
    p.add_argument("--steps", type=int, help="inversion / edit steps (default 10, --quick 6)")
    p.add_argument("--repeats", type=int, help="interleaved timed runs per side and case (default 5, --quick 1)")
    args = p.parse_args(argv)
    _common.setup(args)
    size = args.size or (8 if args.quick else 16)
    steps = args.steps or (6 if args.quick else 10)
    repeats = args.repeats or (1 if args.quick else 5)

    _comfy.start()
    import torch

    import comfy.utils
    from harness import ledits_shared as ref
    from harness.pack import RowCounter, concept_inputs, node_output, pack_module
    from harness.shared_unet import shared_unet

    comfy.utils.PROGRESS_BAR_ENABLED = False  # as diffusers' progress bar is disabled (ComfyUI's --disable flag)
    shared = shared_unet()
    model = shared.comfy
    gen = torch.Generator().manual_seed(SEED)
    prompts = ["", SOURCE] + CONCEPTS
    embeddings = {t: torch.randn(77, 768, generator=gen) for t in prompts}
    conds = {t: [[e.unsqueeze(0), {}]] for t, e in embeddings.items()}
    x0 = torch.randn(1, 4, size, size, generator=gen)  # the photo's latent as diffusers holds it
    photo = {"samples": x0 / ref.SCALING_FACTOR}  # as VAE Encode gives it (before process_latent_in)
    pipe = ref.ledits_pipeline(shared.diffusers, embeddings)
    tally = ref.RowTally(shared.diffusers)

    invert_node = pack_module("nodes.photo_invert").SEGAInvertPhoto
    edit_node = pack_module("nodes.photo_edit").SEGAPhotoEdit
    concept_node = pack_module("nodes.concept_nodes").SEGAConcept

    def chain(settings):
        out = None
        for text, s in zip(CONCEPTS, settings):
            inputs = concept_inputs(conds[text], label=text, concepts=out, **dict(LEDITS_CONCEPT, **s))
            out = node_output(concept_node.execute(**inputs))
        return out

    def pack_invert(m, source):
        return node_output(invert_node.execute(model=m, latent=photo, uncond=conds[""], steps=steps, skip=SKIP,
                                               seed=SEED, source=conds[source] if source else None,
                                               source_guidance=3.5))

    def pack_edit(m, inversion, concepts, reconstruction):
        return node_output(edit_node.execute(model=m, inversion=inversion, concepts=concepts, combination="ledits",
                                             reconstruction=reconstruction))["samples"]

    def diffusers_edit(source, settings):
        edits = [(text, ref.Edit(scale=LEDITS_CONCEPT["edit_scale"], threshold=LEDITS_CONCEPT["threshold"],
                                 warmup=s.get("warmup", 0), cooldown=s.get("cooldown"),
                                 reverse=s.get("direction") == "remove"))
                 for text, s in zip(CONCEPTS, settings)]
        return ref.edit(pipe, edits)

    row_table, time_table, failures = [], [], []
    mem = None
    for name, source, reconstruction, settings in CASES:
        concepts = chain(settings)
        # untimed: rows of both, and the two edited latents
        counter = RowCounter()
        counted = counter.attach(model)  # one counted model for both: the edit reuses the inversion's first step
        inversion = pack_invert(counted, source)
        inv_rows = list(counter.rows)
        counter.rows.clear()
        pack_out = pack_edit(counted, inversion, concepts, reconstruction)
        edit_rows = list(counter.rows)
        tally.clear()
        ref.invert(pipe, x0, steps, SKIP, SEED, source or "", 3.5)
        d_inv = list(tally.rows)
        tally.clear()
        d_out = diffusers_edit(source, settings)
        d_edit = list(tally.rows)
        diff = (pack_out * ref.SCALING_FACTOR - d_out).abs().max().item()
        counts = (sum(inv_rows), sum(edit_rows), sum(d_inv), sum(d_edit))
        expected = expected_rows(source, reconstruction, settings, steps)
        ok = counts == expected and counts[0] <= counts[2] and (reconstruction == "exact" or counts[1] < counts[3])
        if not ok:
            failures.append(f"{name}: rows {counts}, expected {expected}")
        row_table.append([
            name, steps, f"{counts[0]} in {len(inv_rows)} calls", f"{counts[2]} in {len(d_inv)} calls",
            f"{counts[1]} in {len(edit_rows)} calls", f"{counts[3]} in {len(d_edit)} calls",
            f"{(counts[0] + counts[1]) / (counts[2] + counts[3]):.3f}", f"{expected[0]} / {expected[1]}",
            "PASS" if ok else "FAIL"])
        if mem is None:
            mem = (inversion.nbytes(), ref.inversion_bytes(pipe), inversion.zs.shape)

        # timed: invert + edit, the two sides interleaved
        def run_pack(source=source, concepts=concepts, reconstruction=reconstruction):
            pack_edit(model, pack_invert(model, source), concepts, reconstruction)

        def run_diffusers(source=source, settings=settings):
            ref.invert(pipe, x0, steps, SKIP, SEED, source or "", 3.5)
            diffusers_edit(source, settings)

        cpu = {"diffusers": [], "pack": []}
        times = _common.interleaved({"diffusers": with_cpu(run_diffusers, cpu["diffusers"]),
                                     "pack": with_cpu(run_pack, cpu["pack"])}, repeats, warmup=1)
        t_pack, t_ref = _common.median(times["pack"]), _common.median(times["diffusers"])
        c_pack, c_ref = _common.median(cpu["pack"][1:]), _common.median(cpu["diffusers"][1:])  # warm-up dropped
        ratio = t_pack / t_ref
        row_ratio = (counts[0] + counts[1]) / (counts[2] + counts[3])
        time_table.append([name, f"{row_ratio:.3f}", f"{t_ref:.2f}", f"{t_pack:.2f}", f"{ratio:.3f}",
                           f"{c_pack / c_ref:.3f}", _common.verdict(ratio <= 1.0), f"{diff:.1e}"])
    tally.remove()

    # memory: what each side keeps of one inversion
    pack_bytes, ref_bytes, zs_shape = mem
    latent = 4 * zs_shape[1:].numel()  # one float32 latent
    n = zs_shape[0]
    pack_formula = (n + 4) * latent + (n + 1) * 4  # zs, start, correction, photo, first uncond; sigmas
    ref_formula = (2 * n + 1) * latent  # zs; the N + 1 intermediate latents behind init_latents
    if (pack_bytes, ref_bytes) != (pack_formula, ref_formula):
        failures.append(f"inversion bytes {pack_bytes} / {ref_bytes}, formula {pack_formula} / {ref_formula}")
    xl_latent = 4 * torch.Size(SDXL_LATENT).numel()
    xl_pack = (SDXL_STEPS + 4) * xl_latent + (SDXL_STEPS + 1) * 4
    xl_ref = (2 * SDXL_STEPS + 1) * xl_latent
    mem_table = [
        [f"measured: {steps} steps, latent (1, 4, {size}, {size})", f"{pack_bytes:,} B", f"{ref_bytes:,} B",
         f"{pack_bytes / n:,.0f} B", f"{ref_bytes / n:,.0f} B", f"{pack_bytes / ref_bytes:.3f}"],
        [f"SDXL 1024x1024, {SDXL_STEPS} steps, latent {SDXL_LATENT} float32", f"{xl_pack:,} B ({mib(xl_pack)})",
         f"{xl_ref:,} B ({mib(xl_ref)})", f"{xl_pack / SDXL_STEPS:,.0f} B", f"{xl_ref / SDXL_STEPS:,.0f} B",
         f"{xl_pack / xl_ref:.3f}"],
    ]

    body = "\n\n".join([
        _common.table(["case", "steps", "pack inversion rows", "diffusers inversion rows", "pack edit rows",
                       "diffusers edit rows", "pack / diffusers (all rows)", "expected pack rows (invert / edit)",
                       "result"], row_table),
        _common.table(["case", "row ratio pack / diffusers", "diffusers s/run (median)", "pack s/run (median)",
                       "time ratio pack / diffusers", "CPU-time ratio", "time ratio <= 1.0",
                       "max abs(pack - diffusers), edited latent"], time_table),
        _common.table(["inversion kept", "pack", "diffusers", "pack per step", "diffusers per step",
                       "pack / diffusers"], mem_table),
    ])
    notes = (
        f"Same UNet weights on both sides (harness.shared_unet, 18.7 M parameters, float32, CPU), latent "
        f"{size}x{size} ({8 * size} px), {steps} steps, skip {SKIP}, seed {SEED}, source guidance 3.5, concepts at "
        f"edit scale 5, threshold 0.9, warm-up 0 unless stated; {repeats} interleaved timed runs of invert + edit "
        f"per side and case after one warm-up round. The pack runs SEGA Invert Photo and SEGA Photo Edit "
        f"(reconstruction \"as diffusers\" unless the case says \"exact\") through ComfyUI's guider and sampler; "
        f"diffusers runs LEditsPPPipelineStableDiffusion.invert() and __call__() with stand-in text encoder and "
        f"VAE (their cost is negligible on both sides). diffusers' invert() sets the UNet to its classic "
        f"attention processor (AttnProcessor) for both phases; ComfyUI uses its own attention. The pack's first "
        f"edit step takes its base rows from the inversion (the edit starts at the inversion's start, on its "
        f"first noise level, with the same model) and computes only the concepts there. With a source prompt "
        f"the pack inverts with one call of 2 rows per step where diffusers makes 2 calls of 1 row, guiding "
        f"towards the source prompt where diffusers' SD pipeline guides away from it (its swapped roles, a "
        f"deliberate deviation), so the latents differ in those cases; \"exact\" then edits with the "
        f"source-guided prediction (2 + concepts rows), which diffusers' edit drops (1 + concepts rows), and "
        f"reconstructs the photo, which diffusers' edit does not. The pack computes only the concepts acting "
        f"at a step; diffusers computes every concept at every step. Memory: the pack keeps the noise maps, "
        f"the start, the correction, the photo's latent, the first step's uncond prediction and the sigmas "
        f"((N + 4) latents; N + 5 with a source prompt); the pipeline keeps its noise "
        f"maps and, through init_latents (a view), all N + 1 intermediate latents ((2N + 1) latents). Row "
        f"counts and bytes are exact: a FAIL exits with status 1.")
    _common.finish(args, _common.section("5. LEDITS++ photo edits: pack against diffusers on the same UNet",
                                         body, notes))
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
