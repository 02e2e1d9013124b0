"""The concepts' cross-attention maps, captured as the model runs (LEDITS++'s M1, arXiv:2311.16711).

One `attn2_patch` (ComfyUI's list hook before cross-attention: it composes with other packs'
attention patches) is put on a model whose SEGA concepts use mask_from "attention" or
"intersect". It does nothing unless the sampling run holds an AttentionCapture in its
transformer_options and that capture is waiting for an evaluation. Then, only at the
cross-attention layers of the down and up blocks whose query map is a quarter of the latent (as
diffusers' LEDITS++ picks them) and only for the concept rows, it recomputes softmax(q k^T) from
the layer's own to_q / to_k weights (optimised attention kernels never return probabilities): on
CUDA as fused attention calls whose value is the indicator of the token positions, on the CPU as
chunked scores, in head groups and query chunks sized from the latent, so that what it holds stays
below one latent per concept (sega_core.attention.projected_token_attention), reduces it to one
(B, h*w) sum per concept (token positions: sega_core.attention.token_positions, all of CLIP's 75 or the
concept's words) and returns its inputs unchanged: the model's output stays bit for bit what it was.

Which rows are the concepts': calc_cond_batch puts each cond's index in the evaluation's conds list
into transformer_options["cond_or_uncond"], one entry per batch chunk of equal size. The SEGA patch
evaluates [positive, negative, concept rows...] (indices 2, 3, ...), the photo guider
[uncond, (source), concept rows...]; the caller says which index is which concept.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..sega_core.attention import (attention_mask, intersects, projected_token_attention, token_attention,
                                   token_positions)
from .errors import SEGAError

ATTN_KEY = "sega_attention"  # the run's AttentionCapture, in its transformer_options
OVERRIDE_KINDS = ("mmdit", "wan")  # model_kind()s captured through nodes.attention_override
_BLOCKS = ("input", "output")  # diffusers' down and up blocks; the middle block is left out


class AttentionCapture:
    """The cross-attention maps of one sampling run's concept rows, one evaluation at a time."""

    def __init__(self, diffusion_model: torch.nn.Module, model=None, words: Optional[Dict[int, int]] = None):
        self.diffusion_model = diffusion_model
        self.kind = model_kind(diffusion_model)
        # diffusers' SDXL pipeline intersects at every step; the transformers (Flux, SD3, Wan) have no
        # reference: at every step too
        self.always_intersect = _is_sdxl(model) or self.kind != "unet"
        self._index: Dict[int, int] = {}  # cond index in the evaluation -> plan concept
        self._sums: Dict[int, torch.Tensor] = {}  # concept -> (B, h*w) sum over layers and heads
        self._heads: Dict[int, int] = {}  # concept -> layers x heads summed
        self._hw = None  # (h, w) of the map
        self._latent = None  # (H, W) of the evaluation's latent: rows of another size (an area's crop) are left out
        self.layers_seen = 0  # layers captured in the last evaluation (for tests)
        self._positions = {}  # (context length, device, clip, words) -> token positions, made once on the device
        self.words = dict(words or {})  # concept -> its word tokens, when its mask sums only those (mask_words)
        self._timestep = None  # a CPU copy of the model's sigma -> timestep conversion, made once
        # Wan (attention_override): (concept, image, key count) -> the prompt's token positions, found once
        # per run; and (transformer_options, block, count) of the last attention call seen
        self.prompt_positions: Dict[tuple, torch.Tensor] = {}
        self.wan_call = None

    @property
    def waiting(self) -> bool:
        return bool(self._index)

    def begin(self, index_to_concept: Dict[int, int], latent_size=None) -> None:
        """Capture, during the next model evaluation, the rows of these cond indices (of a latent of
        `latent_size` (H, W), when given: batches of another size, an area's crop, are left out)."""
        self._index = dict(index_to_concept)
        self._latent = None if latent_size is None else tuple(int(v) for v in latent_size)
        self._sums, self._heads, self._hw = {}, {}, None
        self.layers_seen = 0

    def end(self) -> Dict[int, torch.Tensor]:
        """The evaluation's maps: concept -> (B, h, w), the mean over layers and heads of the
        attention summed over the token positions; concepts with no captured layer are left out."""
        maps = {}
        if self._hw is not None:
            for c, s in self._sums.items():
                maps[c] = (s / self._heads[c]).view(s.shape[0], *self._hw)
        self._index, self._sums, self._heads = {}, {}, {}
        return maps

    def positions(self, length: int, device, clip: bool = True, words=None) -> torch.Tensor:
        """The token positions M1 sums (sega_core.attention.token_positions: CLIP's 75 after the start
        token, or its first `words`; every one when not `clip`), made once per run on the device."""
        key = (length, str(device), clip, words)
        pos = self._positions.get(key)
        if pos is None:
            pos = (token_positions(length, words=words, device=device) if clip
                   else torch.arange(length, device=device))
            self._positions[key] = pos
        return pos

    def wants(self, cond_or_uncond) -> bool:
        """Whether a call over these cond indices holds a row this evaluation captures."""
        return bool(cond_or_uncond) and any(i in self._index for i in cond_or_uncond)

    def concept_rows(self, batch: int, cond_or_uncond):
        """(concept, rows) of each captured cond index's rows in a call's batch of `batch` rows."""
        b = batch // len(cond_or_uncond)
        for chunk, index in enumerate(cond_or_uncond):
            c = self._index.get(index)
            if c is not None:
                yield c, slice(chunk * b, (chunk + 1) * b)

    def add(self, concept: int, sums: torch.Tensor, heads: int) -> None:
        """One layer's (B, h*w) sums over `heads` heads for `concept`."""
        self._sums[concept] = sums if concept not in self._sums else self._sums[concept] + sums
        self._heads[concept] = self._heads.get(concept, 0) + heads

    def layer_done(self, hw) -> None:
        """A layer was captured, its map (h, w)."""
        self._hw = hw
        self.layers_seen += 1

    def grid(self, patch: int) -> Optional[tuple]:
        """The evaluation's latent in patches of `patch` (a transformer's token grid), or None when the
        latent's size is not known."""
        if self._latent is None:
            return None
        h, w = self._latent
        return (h + patch - 1) // patch, (w + patch - 1) // patch

    def timestep(self, model_patcher, sigma: float) -> int:
        """The model's timestep (0..999) at a host sigma, computed on the CPU: a copy of the model's
        model_sampling is made once, so no step waits for the device."""
        if self._timestep is None:
            import copy

            self._timestep = copy.deepcopy(model_patcher.get_model_object("model_sampling")).to("cpu")
        return round(float(self._timestep.timestep(torch.tensor([float(sigma)]))[0]))

    def layer(self, extra_options: dict):
        """The cross-attention module of the transformer block that calls the patch, or None."""
        block = extra_options.get("block")
        if block is None or block[0] not in _BLOCKS:
            return None
        blocks = self.diffusion_model.input_blocks if block[0] == "input" else self.diffusion_model.output_blocks
        for layer in blocks[block[1]]:
            tb = getattr(layer, "transformer_blocks", None)
            if tb is not None:
                return tb[extra_options.get("block_index", 0)].attn2
        return None

    def __call__(self, n: torch.Tensor, context: torch.Tensor, extra_options: dict) -> None:
        cond_or_uncond = extra_options.get("cond_or_uncond") or []
        shape = extra_options.get("original_shape")
        if not cond_or_uncond or shape is None or len(shape) != 4:
            return
        if self._latent is not None and tuple(shape[-2:]) != self._latent:
            return
        hw = (int(shape[-2] / 4), int(shape[-1] / 4))  # diffusers: (int(h / 4), int(w / 4))
        if n.shape[1] != hw[0] * hw[1] or not self.wants(cond_or_uncond):
            return
        attn = self.layer(extra_options)
        if attn is None:
            return
        heads = int(extra_options["n_heads"])
        # the layer's projections, made chunk by chunk: what the capture holds stays below one latent
        (wq, bq), (wk, bk) = _weights(attn.to_q, n), _weights(attn.to_k, context)
        with torch.no_grad():
            for c, rows in self.concept_rows(n.shape[0], cond_or_uncond):
                positions = self.positions(context.shape[1], n.device, words=self.words.get(c))
                self.add(c, projected_token_attention(n[rows], context[rows], wq, wk, heads, positions,
                                                      int(shape[1]) * int(shape[2]) * int(shape[3]), bq, bk), heads)
        self.layer_done(hw)


    def joint(self, q: torch.Tensor, k: torch.Tensor, pe, extra_options: dict) -> None:
        """Flux's double blocks (joint attention; q, k: (rows, heads, text + image tokens, d) before
        RoPE): the image tokens' attention to the text tokens, with RoPE applied as the block's own
        attention applies it, summed over every text position (T5 has no start token) and the heads;
        sized from the row's latent as on SD3 (token_attention: fused on CUDA, chunked scores on the
        CPU; the RoPE'd q and k of the row are made whole)."""
        cond_or_uncond = extra_options.get("cond_or_uncond") or []
        hw = self.grid(getattr(self.diffusion_model, "patch_size", 2))
        if extra_options.get("block_type") != "double" or hw is None or not self.wants(cond_or_uncond):
            return
        txt = int(extra_options["img_slice"][0])
        if q.shape[2] < txt + hw[0] * hw[1] or txt < 1:
            return
        from comfy.ldm.flux.math import apply_rope

        heads = q.shape[1]
        positions = self.positions(txt, q.device, clip=False)
        latent = hw[0] * hw[1] * int(getattr(self.diffusion_model, "out_channels", 64))  # the patches' channels
        with torch.no_grad():
            for c, rows in self.concept_rows(q.shape[0], cond_or_uncond):
                qr, kr = q[rows], k[rows]
                if pe is not None:
                    qr, kr = apply_rope(qr, kr, pe[rows] if pe.shape[0] == q.shape[0] else pe)
                qi = qr[:, :, txt:txt + hw[0] * hw[1]]
                self.add(c, token_attention(qi.transpose(1, 2).flatten(2), kr.transpose(1, 2).flatten(2), heads,
                                            positions, latent), heads)
        self.layer_done(hw)


def attention_patch(n, context, value, extra_options):
    """The attn2_patch: hands the concept rows to the run's AttentionCapture, returns its inputs unchanged."""
    capture = extra_options.get(ATTN_KEY)
    if capture is not None and capture.waiting:
        capture(n, context, extra_options)
    return n, context, value


def joint_attention_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
    """Flux's attn1_patch (double and single blocks call it with q, k, v before RoPE): hands the concept
    rows of the double blocks to the run's AttentionCapture; changes nothing."""
    capture = (extra_options or {}).get(ATTN_KEY)
    if capture is not None and capture.waiting:
        capture.joint(q, k, pe, extra_options)
    return {}


def check_model(model, plan, where) -> None:
    """A SEGAError naming the first concept that needs an attention map when `model` cannot give one:
    SD-style UNets (SD 1.x, 2.x, SDXL) and Flux through their attention patches, SD3 and Wan through
    the optimized_attention_override (nodes.attention_override) can; no other model is patched."""
    dm = model.model.diffusion_model
    if not plan.attention or model_kind(dm) is not None:
        return
    c = plan.attention[0]
    raise SEGAError(
        f"{where(c)}: mask_from '{plan.mask_from[c]}' needs the concept's cross-attention map, which this model "
        f"({type(dm).__name__}) does not give: attention masks work with SD 1.x, SD 2.x, SDXL, SD3, Flux "
        f"and Wan. "
        f"Use mask_from 'implicit' for this model.")


def install(model) -> None:
    """Put the capture's patch on a (cloned) ModelPatcher, once: attn2_patch on UNets, Flux's
    attn1_patch on Flux, the optimized_attention_override on SD3 and Wan (nodes.attention_override)."""
    kind = model_kind(model.model.diffusion_model)
    if kind in OVERRIDE_KINDS:
        from . import attention_override

        attention_override.install(model)
        return
    name, patch = ("attn1_patch", joint_attention_patch) if kind == "flux" else ("attn2_patch", attention_patch)
    patches = model.model_options.get("transformer_options", {}).get("patches", {}).get(name, [])
    if patch not in patches:
        model.set_model_patch(patch, name)


def start_capture(model_options: dict, model_patcher, mask_words=()) -> AttentionCapture:
    """A fresh AttentionCapture in a sampling run's (cloned) model_options; `mask_words`: the plan's
    (per concept, the word tokens its SD-style UNet mask sums, None for all 75 positions)."""
    capture = AttentionCapture(model_patcher.model.diffusion_model, model_patcher.model,
                               {c: int(w) for c, w in enumerate(mask_words) if w is not None})
    model_options.setdefault("transformer_options", {})[ATTN_KEY] = capture
    if capture.kind in OVERRIDE_KINDS:
        # a node after SEGA's may have set its own override in place of SEGA's: chain it in this run
        from . import attention_override

        attention_override.chained(model_options)
    return capture


def masks_for(maps: Dict[int, torch.Tensor], needed, plan, x: torch.Tensor, where) -> list:
    """Per concept of the plan: M1 at x's latent size (B, 1, H, W) for the concepts in `needed`, else
    None; (B, 1, 1, H, W) for a video latent (B, C, T, H, W): one mask for every frame. `where(c)` names
    concept c in the error when its map is missing."""
    out = [None] * len(plan)
    for c in needed:
        m = maps.get(c)
        if m is None:
            raise SEGAError(
                f"{where(c)}: mask_from '{plan.mask_from[c]}' needs the concept's cross-attention map, but the "
                f"model has no cross-attention layer at a quarter of the latent's size (UNet models: SD 1.x, "
                f"SD 2.x, SDXL, with a latent of at least 8x8; Flux on a ComfyUI whose Flux blocks call attn1_patch, "
                f"as v0.33.0 does; SD3 and Wan through ComfyUI's optimized_attention_override, which another node "
                f"may have replaced), or the concept's conditioning has an area. "
                f"Use mask_from 'implicit' for this model.")
        mask = attention_mask(m, plan.threshold[c], x.shape[-2:]).to(x.device)
        out[c] = mask.unsqueeze(2) if x.dim() == 5 else mask
    return out


def intersect_now(capture: AttentionCapture, model_patcher, sigma: float) -> bool:
    """Whether "intersect" uses both masks at this step's scheduled sigma (a host float): SDXL
    always, SD at timesteps t <= 800 (t rounded to diffusers' integer timesteps)."""
    if capture.always_intersect:
        return True
    return intersects(capture.timestep(model_patcher, sigma), False)


def _weights(linear, x: torch.Tensor):
    """(weight, bias) of a layer's Linear as its forward applies them to `x`: the parameters themselves,
    or, when ComfyUI casts them as the layer runs (manual cast, low VRAM, weight patches applied on the
    fly), comfy.ops' own cast, made once per captured layer as the layer's own call makes it."""
    w = getattr(linear, "weight", None)
    if (w is None or getattr(linear, "comfy_cast_weights", False) or getattr(linear, "weight_function", None)
            or getattr(linear, "bias_function", None) or w.dtype != x.dtype or w.device != x.device):
        import comfy.ops

        weight, bias = comfy.ops.cast_bias_weight(linear, x)[:2]
        return weight, bias
    return w, linear.bias


def model_kind(diffusion_model) -> Optional[str]:
    """Which capture a diffusion model takes: "unet" (SD 1.x, 2.x, SDXL: attn2_patch), "flux"
    (attn1_patch), "mmdit" (SD3) or "wan" (both through the optimized_attention_override,
    nodes.attention_override); None for any other model (attention masks are refused there)."""
    import comfy.ldm.flux.model as flux
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ldm.wan.model as wan

    for kind, cls in (("unet", openaimodel.UNetModel), ("flux", flux.Flux), ("mmdit", mmdit.MMDiT),
                      ("wan", wan.WanModel)):
        if isinstance(diffusion_model, cls):
            return kind
    return None


def _is_sdxl(model) -> bool:
    try:
        import comfy.model_base
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, comfy.model_base.SDXL)
