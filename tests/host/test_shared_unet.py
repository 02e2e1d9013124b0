"""harness.shared_unet: one set of random UNet weights that ComfyUI loads (its own loader, detected as
SD15 / EPS) and diffusers runs (keys mapped by ComfyUI's unet_to_diffusers) gives the same eps."""
from __future__ import annotations

import comfy_host

comfy_host.prepare_host()
import pytest
import torch

import comfy.model_base
import comfy.supported_models

from families import one_thread  # noqa: F401  (fixture)
from harness.shared_unet import shared_unet

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5  # float32


@pytest.fixture(scope="module")
def unet():
    return shared_unet()


def inputs(seed, batch=2, h=16, w=24):
    """A random latent (non-square), a distinct integer timestep per row and a random context."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=gen)
    t = torch.randint(1, 1000, (batch,), generator=gen).float()
    ctx = torch.randn(batch, 77, 768, generator=gen)
    return x, t, ctx


def diffusers_eps(unet, x, t, ctx):
    with torch.no_grad():
        return unet.diffusers(x, t, encoder_hidden_states=ctx).sample


def comfy_eps(unet, x, t, ctx):
    """eps through ComfyUI's model wrapper: the sampler-space input X = x sqrt(1 + sigma^2) at the
    timestep's sigma, BaseModel.apply_model (EPS: input scaling, sigma -> timestep, denoised), then
    eps = (X - denoised) / sigma as a sampler sees it."""
    model = unet.comfy.model
    sigma = model.model_sampling.sigma(t).view(-1, 1, 1, 1)
    big_x = x * (sigma ** 2 + 1).sqrt()
    with torch.no_grad():
        denoised = model.apply_model(big_x, sigma.flatten(), c_crossattn=ctx)
    return (big_x - denoised) / sigma


def test_comfyui_detects_sd15_eps(unet):
    model = unet.comfy.model
    assert type(model.model_config) is comfy.supported_models.SD15
    assert model.model_type == comfy.model_base.ModelType.EPS
    n_comfy = sum(p.numel() for p in model.diffusion_model.parameters())
    n_diffusers = sum(p.numel() for p in unet.diffusers.parameters())
    assert n_comfy == n_diffusers == sum(v.numel() for v in unet.state_dict.values())
    assert n_comfy < 20_000_000  # small enough for the CPU
    # every weight of both layouts used once, and the same tensor on both sides
    assert len(unet.key_map) == len(unet.state_dict) == len(set(unet.key_map.values()))
    comfy_sd = model.diffusion_model.state_dict()
    for dk, value in unet.diffusers.state_dict().items():
        assert torch.equal(value, comfy_sd[unet.key_map[dk]]), dk


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_eps_in_comfyui_and_diffusers(unet, seed):
    x, t, ctx = inputs(seed)
    ref = diffusers_eps(unet, x, t, ctx)
    with torch.no_grad():
        raw = unet.comfy.model.diffusion_model(x, timesteps=t, context=ctx)
    wrapped = comfy_eps(unet, x, t, ctx)
    err_raw = (raw - ref).abs().max().item()
    err_wrapped = (wrapped - ref).abs().max().item()
    print(f"seed {seed}: t {t.tolist()}, max |eps| {ref.abs().max().item():.3f}, "
          f"max abs diff: UNet {err_raw:.1e}, through apply_model {err_wrapped:.1e}")
    assert err_raw <= TOL
    assert err_wrapped <= TOL
    # the comparison can fail: the eps depend on the context and the timestep far beyond the tolerance
    other_ctx = diffusers_eps(unet, x, t, inputs(seed + 100)[2])
    other_t = diffusers_eps(unet, x, (t + 200) % 1000, ctx)
    assert (other_ctx - ref).abs().max().item() > 1000 * TOL
    assert (other_t - ref).abs().max().item() > 1000 * TOL


def test_other_seed_other_weights(unet):
    other = shared_unet(seed=1)
    x, t, ctx = inputs(5, batch=1)
    assert (diffusers_eps(other, x, t, ctx) - diffusers_eps(unet, x, t, ctx)).abs().max().item() > 1000 * TOL
