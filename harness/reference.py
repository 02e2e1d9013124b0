"""diffusers' SemanticStableDiffusionPipeline run offline with stand-in parts, and a torch port of
its step. For developing the pack only (the tests and the benchmarks): .comfyignore leaves it out
of the Registry zip. diffusers is imported only when a pipeline is built.

The real pipeline runs; only its models are replaced, so nothing is downloaded:
  Tokenizer             maps each known string to one id: "" (uncond) 0, "prompt" or "prompt<j>"
                        1 + j, "concept<k>" 100 + k, repeated `length` times;
  TextEncoder           the embedding of a prompt is its id (so a stand-in UNet can tell rows apart);
  EmbeddingTextEncoder  a table lookup of the id (a real UNet's width, e.g. 768);
  PredictionUNet        returns, for step i and each row it is given, the prediction chosen by the
                        caller (uncond u[i, s], text t[i, s] or concept e[i, k, s] for sample s), and
                        checks that every row sits where the pipeline's chunking expects it;
  FixedUNet             returns the same tensor at every step (for timing the pipeline's own work).
`pipeline(unet, ...)` builds the pipeline around them with a real DDIMScheduler; `record_steps`
records the noise prediction the pipeline hands the scheduler at every step; `FixedPipeline` runs
it on fixed predictions with or without editing prompts.

reference_step is a line-for-line torch port of one denoising step of the pipeline (every concept
computed, no skipping, NaN quirk included), generalised only in that the threshold flattens all
axes after (B, C), so it also runs on video latents. tests/core/test_sega_reference.py checks it
against the real pipeline, so the tests and benchmarks that use it rest on a checked oracle.
"""
from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace
from typing import Sequence

import torch

NEVER = 10**6  # the reference takes only ints in a per-concept cooldown list: "never" is a far step
CONCEPT_ID = 100  # the id of "concept0"; prompts take the ids below


def token_id(text: str) -> int:
    """The stand-in tokenizer's id of one known string."""
    if text in ("", "prompt"):
        return {"": 0, "prompt": 1}[text]
    for word, first, count in (("prompt", 1, CONCEPT_ID - 1), ("concept", CONCEPT_ID, None)):
        rest = text[len(word):]
        if text.startswith(word) and rest.isdigit() and (count is None or int(rest) < count):
            return first + int(rest)
    raise KeyError(f"the stand-in tokenizer knows '', 'prompt', 'prompt<j>' and 'concept<k>', not {text!r}")


class Tokenizer:
    def __init__(self, length: int = 2):
        self.model_max_length = length

    def __call__(self, texts, padding=None, max_length=None, return_tensors=None, truncation=None):
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.tensor([[token_id(x)] * self.model_max_length for x in texts], dtype=torch.long)
        return SimpleNamespace(input_ids=ids)


class TextEncoder:
    def __call__(self, input_ids):
        return (input_ids.to(torch.float32).unsqueeze(-1),)  # (n, seq, 1): the id is the embedding


class EmbeddingTextEncoder:
    """Row `id` of `table` (ids, width) for every token: embeddings of a real text encoder's width."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, input_ids):
        return (self.table[input_ids.to(self.table.device)],)


class PredictionUNet:
    """Returns the caller's predictions for the rows it is given; checks the rows' layout."""

    def __init__(self):
        self.config = SimpleNamespace(in_channels=4, sample_size=1)
        self.set(None, None, None, 1)

    def set(self, u, t, e, images_per_prompt):
        """u, t: (T, B, ...) per step and sample; e: (T, N, B, ...) per step, concept and sample."""
        self.u, self.t, self.e, self.images_per_prompt = u, t, e, images_per_prompt
        self.calls = 0

    def __call__(self, sample, timestep, encoder_hidden_states=None):
        i = self.calls
        self.calls += 1
        batch = self.u.shape[1]
        ids = encoder_hidden_states[:, 0, 0].round().long().tolist()
        assert len(ids) == sample.shape[0]
        out = []
        for r, pid in enumerate(ids):
            chunk, s = divmod(r, batch)
            if pid == 0:
                assert chunk == 0, f"uncond row {r} in chunk {chunk}"
                out.append(self.u[i, s])
            elif pid < CONCEPT_ID:
                assert chunk == 1 and pid - 1 == s // self.images_per_prompt, f"text row {r}: prompt {pid - 1}"
                out.append(self.t[i, s])
            else:
                k = pid - CONCEPT_ID
                assert chunk == 2 + k, f"concept {k} in chunk {chunk}: samples would get the wrong concept"
                out.append(self.e[i, k, s])
        return SimpleNamespace(sample=torch.stack(out))


class FixedUNet(torch.nn.Module):
    """Returns `out` at every step: uncond, prompt, then the concepts, B rows each.

    A Module with a `device`, so that the pipeline runs on the device of the predictions."""

    def __init__(self, device):
        super().__init__()
        self.config = SimpleNamespace(in_channels=4, sample_size=1)
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.out = None

    def __call__(self, sample, timestep, encoder_hidden_states=None):
        assert sample.shape[0] == self.out.shape[0], (sample.shape, self.out.shape)
        return SimpleNamespace(sample=self.out)


def pipeline(unet, tokenizer=None, text_encoder=None, scheduler=None):
    """diffusers' SemanticStableDiffusionPipeline around `unet` and the stand-ins (default: Tokenizer(),
    TextEncoder(), a DDIMScheduler of 1000 training steps); no VAE, no safety checker, no progress bar."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import DDIMScheduler
        from diffusers.pipelines.deprecated.semantic_stable_diffusion.pipeline_semantic_stable_diffusion import (
            SemanticStableDiffusionPipeline,
        )

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = SemanticStableDiffusionPipeline(
            vae=None, text_encoder=text_encoder or TextEncoder(), tokenizer=tokenizer or Tokenizer(), unet=unet,
            scheduler=scheduler or DDIMScheduler(num_train_timesteps=1000), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_steps(scheduler) -> list:
    """Wraps `scheduler.step` to record the noise prediction (`model_output`) of every step; returns
    the list it appends to (clear it between runs)."""
    recorded = []
    step = scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        recorded.append(model_output.detach().clone())
        return step(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = recording_step
    return recorded


def concept_kwargs(concepts: Sequence, scalars: bool = False) -> dict:
    """The pipeline's editing arguments for sega_core Concepts: one list entry per concept, or, with
    `scalars`, the shared settings of identical concepts as scalars (cooldown None = never)."""
    if scalars:
        assert all(x == concepts[0] for x in concepts)
        one = concepts[0]
        return dict(reverse_editing_direction=one.reverse, edit_guidance_scale=one.scale,
                    edit_warmup_steps=one.warmup, edit_cooldown_steps=one.cooldown,
                    edit_threshold=one.threshold, edit_weights=[one.weight] * len(concepts))
    return dict(reverse_editing_direction=[x.reverse for x in concepts],
                edit_guidance_scale=[x.scale for x in concepts], edit_warmup_steps=[x.warmup for x in concepts],
                edit_cooldown_steps=[NEVER if x.cooldown is None else x.cooldown for x in concepts],
                edit_threshold=[x.threshold for x in concepts], edit_weights=[x.weight for x in concepts])


class FixedPipeline:
    """The pipeline on fixed predictions; `run(edit)` runs `steps` steps with or without SEGA
    (N concepts at scale 5, threshold 0.9, warm-up 0, momentum 0.1 / 0.4)."""

    def __init__(self, u: torch.Tensor, t: torch.Tensor, e: torch.Tensor, steps: int):
        self.pipe = pipeline(FixedUNet(u.device))
        self.b, self.c, self.h, self.w = u.shape
        self.n = e.shape[0]
        self.with_edit = torch.cat([u, t] + list(e))
        self.without = torch.cat([u, t])
        self.steps = steps
        self.latents = torch.zeros_like(u)

    def run(self, edit: bool) -> None:
        unet = self.pipe.unet
        unet.config.in_channels = self.c
        unet.out = self.with_edit if edit else self.without
        kw = {}
        if edit:
            kw = dict(editing_prompt=[f"concept{k}" for k in range(self.n)], edit_guidance_scale=5.0,
                      edit_warmup_steps=0, edit_threshold=0.9, edit_momentum_scale=0.1, edit_mom_beta=0.4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.pipe(prompt=["prompt"] * self.b, height=8 * self.h, width=8 * self.w, num_inference_steps=self.steps,
                      guidance_scale=7.5, latents=self.latents, output_type="latent", **kw)


def threshold_lines(noise_guidance_edit_tmp: torch.Tensor, edit_threshold_c: float = 0.9) -> torch.Tensor:
    """The reference's thresholding lines, verbatim, to show what they do with a given latent shape."""
    tmp = torch.quantile(torch.abs(noise_guidance_edit_tmp).flatten(start_dim=2), edit_threshold_c, dim=2,
                         keepdim=False)
    return torch.where(torch.abs(noise_guidance_edit_tmp) >= tmp[:, :, None, None], noise_guidance_edit_tmp,
                       torch.zeros_like(noise_guidance_edit_tmp))


def reference_step(u, t, e, i, concepts: Sequence, guidance_scale, momentum_scale, momentum_beta,
                   momentum):
    """One step of the reference, transcribed from diffusers' pipeline_semantic_stable_diffusion.py.

    u, t: (B, C, ...); e: (N, B, C, ...); concepts: sega_core Concepts; momentum: (B, C, ...) or
    None (zeros). Returns (noise_pred, momentum'). Keeps the reference's quirks: weights normalised only
    when some concepts are warmed up (0/0 = NaN possible there), cooled-down concepts counted
    as warmed up with weight 0, the momentum updated every step, fp16/bf16 thresholds rounded
    back to the input dtype.
    """
    noise_guidance = guidance_scale * (t - u)
    edit_momentum = torch.zeros_like(noise_guidance) if momentum is None else momentum
    n = e.shape[0]
    concept_weights = torch.zeros((n, noise_guidance.shape[0]), dtype=noise_guidance.dtype)
    noise_guidance_edit = torch.zeros((n, *noise_guidance.shape), dtype=noise_guidance.dtype)
    warmup_inds = []
    for c in range(n):
        cc = concepts[c]
        cooldown = i + 1 if cc.cooldown is None else cc.cooldown
        if i >= cc.warmup:
            warmup_inds.append(c)
        if i >= cooldown:
            noise_guidance_edit[c] = torch.zeros_like(e[c])
            continue
        tmp_edit = e[c] - u
        concept_weights[c, :] = cc.weight
        if cc.reverse:
            tmp_edit = tmp_edit * -1
        tmp_edit = tmp_edit * cc.scale
        flat = torch.abs(tmp_edit).flatten(start_dim=2)
        if tmp_edit.dtype == torch.float32:
            q = torch.quantile(flat, cc.threshold, dim=2, keepdim=False)
        else:
            q = torch.quantile(flat.to(torch.float32), cc.threshold, dim=2, keepdim=False).to(tmp_edit.dtype)
        q = q.view(*q.shape, *([1] * (tmp_edit.dim() - 2)))
        tmp_edit = torch.where(torch.abs(tmp_edit) >= q, tmp_edit, torch.zeros_like(tmp_edit))
        noise_guidance_edit[c] = tmp_edit
    warm = torch.tensor(warmup_inds, dtype=torch.long)
    if n > warm.shape[0] > 0:
        w = torch.index_select(concept_weights, 0, warm)
        w = torch.where(w < 0, torch.zeros_like(w), w)
        w = w / w.sum(dim=0)
        sel = torch.index_select(noise_guidance_edit, 0, warm)
        noise_guidance = noise_guidance + torch.einsum("cb,cb...->b...", w, sel)
    concept_weights = torch.where(concept_weights < 0, torch.zeros_like(concept_weights), concept_weights)
    concept_weights = torch.nan_to_num(concept_weights)
    edit = torch.einsum("cb,cb...->b...", concept_weights, noise_guidance_edit)
    edit = edit + momentum_scale * edit_momentum
    edit_momentum = momentum_beta * edit_momentum + (1 - momentum_beta) * edit
    if warm.shape[0] == n:
        noise_guidance = noise_guidance + edit
    return u + noise_guidance, edit_momentum
