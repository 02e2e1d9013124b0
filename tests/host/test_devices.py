"""Nothing in the pack pins a tensor to one device: every tensor SEGA makes follows the device of
the model call it belongs to (what running on several GPUs needs).

On a CPU-only machine the check switches torch's default device to 'meta' while SEGA's own code
runs: a tensor created without an explicit device would land on 'meta' and the first operation
mixing it with the model call's CPU tensors would fail (or return a 'meta' result). The same check
of sega_core alone is in tests/core/test_sega_devices.py."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import node_helpers

from families import FAMILIES, one_thread  # noqa: F401  (fixture)
from noise_space import sample_recorded
from sega_testlib import PACK_ROOT, concept, pack_module

pytestmark = pytest.mark.usefixtures("one_thread")
FAM = FAMILIES["sd15"]


def _on_meta_by_default(fn):
    def wrapped(*args, **kwargs):
        with torch.device("meta"):
            return fn(*args, **kwargs)
    return wrapped


def test_no_device_is_named_in_the_pack():
    sources = [PACK_ROOT / "__init__.py", *sorted((PACK_ROOT / "nodes").glob("*.py")),
               *sorted((PACK_ROOT / "sega_core").glob("*.py"))]
    # moving data to the CPU to write a file is fine; naming an accelerator is not
    pinned = re.compile(r"""\.cuda\(|["']cuda|torch\.cuda\.|device\s*=\s*["'](cuda|mps|xpu)""")
    found = [f"{p.relative_to(PACK_ROOT)}:{i}" for p in sources
             for i, line in enumerate(Path(p).read_text().splitlines(), 1) if pinned.search(line)]
    assert not found, f"device names in the pack: {found}"


def test_hooks_follow_the_model_calls_device(monkeypatch):
    """A full run with two concepts (different settings), one limited by an area, one by a user mask:
    with 'meta' as torch's default device while SEGA's own code runs, it gives the same result as
    without, on the model call's device."""
    patch = pack_module("nodes.patch")
    area = node_helpers.conditioning_set_values(FAM.cond(3), {"area": (8, 4, 0, 4), "strength": 1.0,
                                                              "set_area_to_bounds": False})
    mask = torch.zeros(64, 64)
    mask[:, :40] = 1.0
    spec = concept(FAM.cond(4), warmup=0, threshold=0.63, scale=3.3, reverse=True)
    masked = type(spec)(spec.conditioning, spec.concept, "", mask)
    concepts = [concept(area, warmup=1, threshold=0.83, weight=0.7), masked]
    model = FAM.build()

    def run():
        m = patch.apply_sega(model, concepts, 0.3, 0.4)
        return sample_recorded(m, FAM.cond(1), FAM.cond(2), torch.zeros(2, *FAM.latent), steps=3, cfg=5.0)[0]

    # on 'meta' first (sega_core caches the constants it builds); SEGA's own code only: the
    # wrappers around ComfyUI's executors would put ComfyUI itself on 'meta'
    with monkeypatch.context() as mp:
        for cls, name in [(patch._Patch, "post_cfg"), (patch._Patch, "_add_concepts"), (patch._Run, "coverage"),
                          (patch._Run, "masks_for"), (patch._Run, "check_finite")]:
            mp.setattr(cls, name, _on_meta_by_default(getattr(cls, name)))
        on_meta = run()
    assert on_meta.device.type == "cpu" and torch.isfinite(on_meta).all()
    torch.testing.assert_close(on_meta, run())


def _on_cuda(patcher):
    """The same tiny model, loaded by ComfyUI onto the first CUDA device (weights offloaded to the CPU)."""
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(patcher.model, load_device=torch.device("cuda", 0),
                                            offload_device=torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_sega_runs_on_the_model_calls_cuda_device(name):
    """On a GPU: ComfyUI samples each family's tiny model on CUDA with two concepts; every prediction
    the model returned and SEGA's edit stay on that device, and the edit ComfyUI applied equals
    sega_core recomputed from the recorded predictions (noise space, momentum) on the same device."""
    from noise_space import plan_of, replay

    family = FAMILIES[name]
    model = _on_cuda(family.build())
    concepts = [concept(family.cond(3), warmup=1, threshold=0.8),
                concept(family.cond(4), warmup=2, reverse=True, scale=3.0, weight=0.5)]
    m = pack_module("nodes.patch").apply_sega(model, concepts, 0.3, 0.5)
    out, calls, steps = sample_recorded(m, family.cond(1), family.cond(2), torch.zeros(2, *family.latent), steps=4,
                                        cfg=family.cfg)
    assert len(calls) == 4
    assert all(t.device.type == "cuda" for c in calls for t in [c["x"], c["final"], *c["out"]])
    edits = replay(calls, steps, plan_of(concepts, 0.3, 0.5), family.cfg, rtol=1e-4, atol=1e-4)
    assert all(e is not None and e.device.type == "cuda" and e.abs().max() > 0 for e in edits[2:])
    assert torch.isfinite(out).all() and out.shape == (2, *family.latent)
