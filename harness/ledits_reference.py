"""diffusers' LEDITS++ pipelines (SD and SDXL), run offline with stand-in parts.

The real `LEditsPPPipelineStableDiffusion` / `LEditsPPPipelineStableDiffusionXL` run their own
`invert()` and `__call__()`; only the models are replaced, so nothing is downloaded:
  - tokenizers that map each known string ("" uncond, "source", "concept<k>") to one id, and text
    encoders whose embedding of a prompt is its id (SDXL: pooled embedding too), so the UNet can
    tell rows apart; SDXL's zeroed empty prompt (force_zeros_for_empty_prompt) is id 0 as well;
  - a VAE whose encode returns the chosen latent (divided by the scaling factor the pipeline
    multiplies by again) and whose decode returns a blank image;
  - a UNet returning `Predictions.eps(step, tag, sample, x)` for every row of its batch: the test's
    per-step, per-row predictions plus a small smooth function of the latent it is given, so a
    wrong latent shows; it checks that each row sits where the pipeline's chunking expects it;
  - the pipeline's own scheduler (an Euler scheduler with SD's betas, which the pipeline turns into
    DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2) as it does for
    SD 1.5's and SDXL's shipped schedulers), whose `step` is wrapped to record every edited latent.

`Predictions.denoise(...)` gives the same predictions in ComfyUI's convention (sampler space,
denoised), for sega_core.ledits.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import List, Optional, Sequence

import torch

NEVER = 10**6  # diffusers takes only ints in a per-concept cool-down list: "never" is a far step
SCALING_FACTOR = 0.18215
UNCOND, SOURCE = 0, 1  # prediction tags; concept k is tag 2 + k
MAX_CONCEPTS = 8


class Config(dict):
    """A config read both as attributes and as a dict, as diffusers' configs are."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


def _vocab():
    vocab = {"": 0, "source": 1}
    vocab.update({f"concept{k}": 100 + k for k in range(MAX_CONCEPTS)})
    return vocab


def tag_of(token_id: int) -> int:
    """The prediction tag of an embedding id: 0 uncond, 1 source, 2 + k concept k."""
    return token_id if token_id < 100 else 2 + token_id - 100


class StubTokenizer:
    model_max_length = 2
    added_tokens_encoder: dict = {}

    def __init__(self):
        self.vocab = _vocab()

    def tokenize(self, text):
        return [text]

    def __call__(self, texts, padding=None, max_length=None, truncation=None, return_tensors=None,
                 return_length=False):
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.tensor([[self.vocab[x]] * self.model_max_length for x in texts], dtype=torch.long)
        return SimpleNamespace(input_ids=ids, length=torch.full((len(texts),), self.model_max_length))


class StubTextEncoder:
    """SD: embeddings (n, seq, 1) holding the prompt's id."""

    dtype = torch.float32
    config = SimpleNamespace()

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=None):
        return (input_ids.to(torch.float32).unsqueeze(-1),)


class _XLOutput(tuple):
    hidden_states: tuple


class StubTextEncoderXL:
    """SDXL: hidden states (n, seq, 1) and a pooled embedding (n, projection_dim) holding the id."""

    dtype = torch.float32

    def __init__(self, projection_dim: int = 2):
        self.config = SimpleNamespace(projection_dim=projection_dim)

    def __call__(self, input_ids, output_hidden_states=True, attention_mask=None):
        h = input_ids.to(torch.float32).unsqueeze(-1)
        pooled = input_ids[:, :1].to(torch.float32).expand(-1, self.config.projection_dim).contiguous()
        out = _XLOutput((pooled,))
        out.hidden_states = (h, h, h)
        return out


class StubVAE:
    """encode(image).latent_dist.mode() is the chosen latent over the scaling factor."""

    dtype = torch.float32

    def __init__(self):
        self.config = Config(scaling_factor=SCALING_FACTOR, block_out_channels=[1, 1, 1, 1], sample_size=64,
                             force_upcast=False)
        self.latent = None

    def encode(self, image, return_dict=True):
        assert image.shape[0] == self.latent.shape[0]
        assert tuple(image.shape[-2:]) == tuple(8 * s for s in self.latent.shape[-2:])
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: self.latent / SCALING_FACTOR))

    def decode(self, z, return_dict=True, generator=None):
        return (torch.zeros(z.shape[0], 3, 8 * z.shape[-2], 8 * z.shape[-1]),)

    def to(self, *args, **kwargs):
        return self


@dataclass
class Predictions:
    """The model's answers: out = table[step, tag, sample] + 0.2 tanh(x) (x: the VP latent it gets),
    an eps prediction, or a v prediction with v_prediction=True (SD 2.x).

    table: (N, 2 + concepts, B, C, H, W); tag 0 uncond, 1 source prompt, 2 + k concept k.
    timesteps: the N timesteps, noisiest first (step k answers timestep k).
    """

    table: torch.Tensor
    timesteps: List[int]
    v_prediction: bool = False
    calls: list = field(default_factory=list)  # (phase, step, [tags]) of every model call

    def eps(self, step: int, tag: int, sample: int, x: torch.Tensor) -> torch.Tensor:
        return self.table[step, tag, sample] + 0.2 * torch.tanh(x)

    def step_of(self, t) -> int:
        return self.timesteps.index(int(t))

    def denoise(self, sigmas, tags=(UNCOND,), combine=None, record: Optional[str] = None):
        """ComfyUI's convention: denoise(X, sigma) with X in sampler space. The model input is
        X / sqrt(1 + sigma^2) (ComfyUI's EPS / V input scaling); each tag's output (`tags`: a
        sequence, or a function of the step giving one) is made a denoised as ComfyUI's EPS or
        V_PREDICTION model sampling makes it, and then eps = (X - denoised) / sigma as the pack's
        nodes see it; the eps are combined by `combine(eps_list, step)` (default: the first),
        denoised = X - sigma * eps."""
        index = {float(s): k for k, s in enumerate(sigmas[:-1])}

        def fn(x, sigma):
            s = float(sigma)
            k = index[s]
            x_in = x / math.sqrt(s * s + 1.0)
            step_tags = list(tags(k) if callable(tags) else tags)
            eps = [torch.stack([self.eps(k, tag, b, x_in[b]) for b in range(x.shape[0])]) for tag in step_tags]
            if self.v_prediction:  # ComfyUI: X / (s^2 + 1) - v s / sqrt(s^2 + 1), sigma_data 1
                eps = [(x - (x / (s * s + 1.0) - v * (s / math.sqrt(s * s + 1.0)))) / s for v in eps]
            if record is not None:
                self.calls.append((record, k, step_tags))
            e = eps[0] if combine is None else combine(eps, k)
            return x - s * e

        return fn


class StubUNet:
    """Returns `Predictions.eps` for every row; checks the rows' layout (uncond chunk first, then one
    chunk per concept, or [uncond, source] when the inversion is guided)."""

    def __init__(self, xl: bool = False, addition_time_embed_dim: int = 1, projection_dim: int = 2):
        self.xl = xl
        self.config = SimpleNamespace(in_channels=4, sample_size=64, time_cond_proj_dim=None,
                                      addition_time_embed_dim=addition_time_embed_dim)
        if xl:
            self.add_embedding = SimpleNamespace(
                linear_1=SimpleNamespace(in_features=6 * addition_time_embed_dim + projection_dim))
        self.preds: Optional[Predictions] = None
        self.phase = "invert"
        self.time_ids = []

    def set_attn_processor(self, processor):
        pass

    def __call__(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None,
                 cross_attention_kwargs=None, return_dict=True, **kwargs):
        p = self.preds
        k = p.step_of(timestep)
        ids = encoder_hidden_states[:, 0, 0].round().long().tolist()
        batch = p.table.shape[2]
        assert len(ids) == sample.shape[0], f"embeddings for {len(ids)} rows, latents for {sample.shape[0]} rows"
        assert len(ids) % batch == 0
        if self.xl:
            pooled = added_cond_kwargs["text_embeds"][:, 0].round().long().tolist()
            assert pooled == ids, f"pooled embeddings {pooled} do not follow the rows {ids}"
            self.time_ids.append(added_cond_kwargs["time_ids"].clone())
        tags = []
        out = []
        for r, pid in enumerate(ids):
            chunk, s = divmod(r, batch)
            tag = tag_of(pid)
            if r % batch == 0:
                tags.append(tag)
            if self.phase == "edit":
                expected = UNCOND if chunk == 0 else 2 + chunk - 1
                assert tag == expected, f"edit row {r}: tag {tag} in chunk {chunk}"
            out.append(p.eps(k, tag, s, sample[r]))
        p.calls.append((self.phase, k, tags))
        out = torch.stack(out)
        return (out,) if not return_dict else SimpleNamespace(sample=out)


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, steps_offset=1, prediction_type=prediction_type)


def _record_steps(pipe):
    """Wrap the scheduler's step (the edit loop's only caller) to record each edited latent."""
    recorded = []
    scheduler = pipe.scheduler
    step = type(scheduler).step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        out = step(scheduler, model_output, timestep, sample, *args, **kwargs)
        recorded.append((out.prev_sample if hasattr(out, "prev_sample") else out[0]).detach().clone())
        return out

    scheduler.step = recording_step
    return recorded


def build(family: str, scheduler=None, prediction_type: str = "epsilon"):
    """A LEDITS++ pipeline of `family` ("sd" or "sdxl") with stand-in parts; `scheduler` defaults to
    an Euler scheduler for `prediction_type` ("epsilon", or "v_prediction" as SD 2.x), which the
    pipeline replaces with SDE-DPM-Solver++(2M)."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family == "sd":
            from diffusers import LEditsPPPipelineStableDiffusion

            pipe = LEditsPPPipelineStableDiffusion(
                vae=StubVAE(), text_encoder=StubTextEncoder(), tokenizer=StubTokenizer(), unet=StubUNet(),
                scheduler=_scheduler(prediction_type) if scheduler is None else scheduler, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
        elif family == "sdxl":
            from diffusers import LEditsPPPipelineStableDiffusionXL

            pipe = LEditsPPPipelineStableDiffusionXL(
                vae=StubVAE(), text_encoder=StubTextEncoderXL(), text_encoder_2=StubTextEncoderXL(),
                tokenizer=StubTokenizer(), tokenizer_2=StubTokenizer(), unet=StubUNet(xl=True),
                scheduler=_scheduler(prediction_type) if scheduler is None else scheduler)
        else:
            raise ValueError(family)
    pipe.set_progress_bar_config(disable=True)
    pipe.recorded = _record_steps(pipe)
    return pipe


@dataclass
class Edit:
    """LEDITS++ per-concept settings as diffusers takes them."""

    scale: float = 5.0
    threshold: float = 0.9
    warmup: int = 0
    cooldown: Optional[int] = None
    reverse: bool = False


def timesteps(pipe, num_steps: int, skip: float) -> List[int]:
    """The inversion timesteps the pipeline will use (it sets the same spacing in invert())."""
    pipe.scheduler.config.timestep_spacing = "leading"
    pipe.scheduler.set_timesteps(int(num_steps * (1 + skip)))
    return [int(t) for t in pipe.scheduler.timesteps[-num_steps:]]


def invert(pipe, preds: Predictions, x0: torch.Tensor, num_steps: int, skip: float, seed: int,
           source_prompt: str = "", source_guidance_scale: float = 3.5, **kwargs):
    """Run the pipeline's invert() on the latent x0. Returns (init_latents, zs, sigmas) with the
    sigmas of the N steps then 0, as the pipeline's scheduler holds them (float32)."""
    pipe.vae.latent = x0
    pipe.unet.preds = preds
    pipe.unet.phase = "invert"
    image = torch.zeros(x0.shape[0], 3, 8 * x0.shape[-2], 8 * x0.shape[-1]) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.invert(image=image, source_prompt=source_prompt, source_guidance_scale=source_guidance_scale,
                    num_inversion_steps=num_steps, skip=skip, generator=torch.Generator().manual_seed(seed),
                    **kwargs)
    assert [int(t) for t in pipe.inversion_steps] == preds.timesteps
    sigmas = [float(s) for s in pipe.scheduler.sigmas[-(num_steps + 1):]]
    return pipe.init_latents.clone(), pipe.zs.clone(), sigmas


def edit(pipe, preds: Predictions, edits: Sequence[Edit], user_mask=None, **kwargs):
    """Run the pipeline's __call__ (implicit masks only). Returns the recorded latents after each
    step, (N, B, C, H, W)."""
    pipe.unet.phase = "edit"
    pipe.recorded.clear()
    kw = {}
    if edits:
        kw = dict(editing_prompt=[f"concept{k}" for k in range(len(edits))],
                  reverse_editing_direction=[e.reverse for e in edits],
                  edit_guidance_scale=[e.scale for e in edits], edit_warmup_steps=[e.warmup for e in edits],
                  edit_cooldown_steps=[NEVER if e.cooldown is None else e.cooldown for e in edits],
                  edit_threshold=[e.threshold for e in edits])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe(output_type="latent", user_mask=user_mask, use_cross_attn_mask=False, use_intersect_mask=False,
             **kw, **kwargs)
    return torch.stack(pipe.recorded)
