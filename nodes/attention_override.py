"""The concepts' attention maps on SD3 and Wan, observed through ComfyUI's optimized_attention_override.

Neither family has an attention patch point that sees what the map needs: SD3's joint blocks call no
per-attention patch, and Wan's attn2_patch gets only the block's output after cross-attention. Both
call ComfyUI's `optimized_attention(q, k, v, heads=..., transformer_options=...)` for every attention
of the model, and ComfyUI's `wrap_attn` hands each such call to
`transformer_options["optimized_attention_override"]` as `override(func, *args, **kwargs)` when one
is set. SEGA puts an `ObservingOverride` there, on its own clone of the model only (never the
attention function of other models): it chains the override that was already set (another pack's:
it is called exactly as before), and when the run's AttentionCapture waits for an evaluation it
computes the concept rows' image-to-text attention sums from the call's q and k, then ALWAYS calls
through (the earlier override, else the function it was given) and returns that result unchanged.

What is captured (no reference exists for these families; the tests show the mask lands where the
concept's tokens are attended):
- SD3 / SD3.5 (MMDiT): every joint block's attention over [text, image] tokens (the call whose
  sequence is longer than the image's tokens; SD3.5's extra image-only self-attention is left out).
  The image tokens' softmax over all tokens, summed over the text positions (every one: CLIP and
  T5 parts and padding, as the Flux path does), mean over heads and blocks. Map: the latent's patch
  grid, ceil(H / 2) x ceil(W / 2).
- Wan (2.1 / 2.2, text-to-video and image-to-video): every block's cross-attention to the text
  (the block's second optimized_attention call, its third on image-to-video blocks, whose second
  attends to the CLIP image tokens), softmax over the text tokens, summed over the prompt's own
  tokens (its padding left out: the softmax runs over the text alone, so the sum over every position
  is 1 everywhere), mean over heads and blocks. Map: the patch grid (T', ceil(H / 2), ceil(W / 2))
  (transformer_options' grid_sizes; ComfyUI v0.8.0 sets none: T' is then the token count over the
  latent's h x w) averaged over the frames T', so one (h, w) map per image of the batch; its mask
  broadcasts over every frame.

Cost: the override adds one Python call per attention call; while a concept row is captured, its
map is computed separately (optimised kernels return no probabilities) from the call's own q and k
(sega_core.attention.token_attention): on CUDA as fused attention calls whose value is the indicator
of the text positions, on the CPU as chunked scores; either way split by heads and query positions
so that what it holds stays below the row's latent (its elements: the image tokens x the patch's x
the model's output channels).
"""
from __future__ import annotations

import torch

from ..sega_core.attention import token_attention
from .attention_masks import ATTN_KEY

OVERRIDE_KEY = "optimized_attention_override"  # ComfyUI's key in transformer_options


class ObservingOverride:
    """transformer_options["optimized_attention_override"] on a SEGA model clone: observes, never changes."""

    def __init__(self, previous=None):
        self.previous = previous  # the override that was set before (another pack's), called through
        if hasattr(previous, "container_function"):
            # calls with tensor containers go straight to the earlier override's container path, as
            # ComfyUI's wrap_attn would send them without this one (SD3 and Wan pass plain tensors)
            self.container_function = previous.container_function

    def __call__(self, func, *args, **kwargs):
        opts = kwargs.get("transformer_options")
        capture = None if not isinstance(opts, dict) else opts.get(ATTN_KEY)
        if capture is not None and capture.waiting:
            observe(capture, args, kwargs)
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)


def chained(options: dict) -> None:
    """Put an ObservingOverride in `options` (a model_options dict), chaining the override already
    there; nothing when it is already one."""
    opts = options.setdefault("transformer_options", {})
    current = opts.get(OVERRIDE_KEY)
    if not isinstance(current, ObservingOverride):
        opts[OVERRIDE_KEY] = ObservingOverride(current)


def install(model) -> None:
    """The override on a (cloned) ModelPatcher's model_options, once."""
    chained(model.model_options)


def observe(capture, args: tuple, kwargs: dict) -> None:
    """Adds the concept rows' maps of one optimized_attention call to `capture` (when the call is one
    the family's maps are taken from)."""
    opts = kwargs["transformer_options"]
    cond_or_uncond = opts.get("cond_or_uncond") or []
    if capture.grid(1) is None or not capture.wants(cond_or_uncond):  # no latent size known, or no concept row
        return
    if len(args) < 3 or not all(isinstance(t, torch.Tensor) for t in args[:2]):
        return
    q, k = args[0], args[1]
    heads = kwargs.get("heads", args[3] if len(args) > 3 else None)
    if heads is None:
        return
    heads = int(heads)
    if kwargs.get("skip_reshape"):  # (B, heads, L, d) -> (B, L, heads * d)
        q, k = (t.transpose(1, 2).flatten(2) for t in (q, k))
    if q.dim() != 3 or k.dim() != 3:
        return
    dm = capture.diffusion_model
    if capture.kind == "wan":
        _wan(capture, dm, q, k, heads, opts, cond_or_uncond)
    elif capture.kind == "mmdit":
        _mmdit(capture, dm, q, k, heads, cond_or_uncond)


def _mmdit(capture, dm, q, k, heads, cond_or_uncond) -> None:
    """SD3: a joint block's attention over [text, image]: the image queries' attention to the text keys."""
    patch = int(getattr(dm, "patch_size", 2))
    hw = capture.grid(patch)
    n = hw[0] * hw[1]
    txt = q.shape[1] - n
    if txt < 1 or k.shape[1] != q.shape[1]:
        return  # SD3.5's image-only self-attention, or a sequence that is not [text, image]
    positions = capture.positions(txt, q.device, clip=False)
    latent = n * patch * patch * int(getattr(dm, "out_channels", 16))  # one row's latent: C x H x W
    with torch.no_grad():
        for c, rows in capture.concept_rows(q.shape[0], cond_or_uncond):
            capture.add(c, token_attention(q[rows, txt:], k[rows], heads, positions, latent), heads)
    capture.layer_done(hw)


def _wan_text_call(dm, block: int) -> int:
    """Which optimized_attention call of Wan block `block` attends to the text: 2 (after the
    self-attention), 3 on image-to-video blocks (their 2nd attends to the CLIP image tokens); 0 for
    blocks of another kind."""
    import comfy.ldm.wan.model as wan

    blocks = getattr(dm, "blocks", None)
    if blocks is None or not 0 <= block < len(blocks):
        return 0
    cross = getattr(blocks[block], "cross_attn", None)
    if isinstance(cross, wan.WanI2VCrossAttention):
        return 3
    if type(cross) is wan.WanT2VCrossAttention:
        return 2
    return 0


def _prompt_positions(capture, concept: int, row: int, keys: torch.Tensor) -> torch.Tensor:
    """The text positions of a Wan concept row's keys (T, C) that hold its prompt's tokens. Wan's
    softmax runs over the text alone, so the sum over every position is 1 everywhere: the map is the
    attention to the prompt's own tokens against its padding. ComfyUI's UMT5 encoder zeroes the padding
    (to 512 tokens), so every padding position has the key of the last one; with fewer than two such
    positions (no padding) every position counts (a uniform map). Found at the first captured layer of
    a run, once per concept and image (one read-back), then reused."""
    found = capture.prompt_positions
    key = (concept, row, keys.shape[0])
    pos = found.get(key)
    if pos is None:
        last = keys[-1].float()
        same = (keys.float() - last).abs().amax(dim=-1) <= 1e-4 * (1.0 + last.abs().amax())
        pos = torch.arange(keys.shape[0], device=keys.device)
        if int(same.sum()) >= 2:
            pos = pos[~same]
        found[key] = pos
    return pos


def _wan(capture, dm, q, k, heads, opts, cond_or_uncond) -> None:
    """Wan: a block's cross-attention to the text, told from its other calls by its place in the block
    (the calls of one model evaluation share one transformer_options, in which the model sets
    block_index before each block)."""
    block = opts.get("block_index")
    if block is None:
        return
    last = capture.wan_call
    count = last[2] + 1 if last is not None and last[0] is opts and last[1] == block else 1
    capture.wan_call = (opts, block, count)
    if count != _wan_text_call(dm, int(block)):
        return
    patch = tuple(int(p) for p in getattr(dm, "patch_size", (1, 2, 2)))
    if patch[1] != patch[2]:
        return
    hw = capture.grid(patch[1])
    grid = opts.get("grid_sizes")
    if grid is not None:
        if len(grid) != 3 or (int(grid[1]), int(grid[2])) != hw:
            return  # another latent (an area's crop)
        frames = int(grid[0])
    else:
        # ComfyUI v0.8.0 does not put grid_sizes in transformer_options: every token is the latent's
        if q.shape[1] % (hw[0] * hw[1]) or getattr(dm, "ref_conv", None) is not None:
            return
        frames = q.shape[1] // (hw[0] * hw[1])
    n = frames * hw[0] * hw[1]
    # the image tokens come first unless a reference latent's tokens precede them (Wan's ref_conv)
    if q.shape[1] < n or (q.shape[1] != n and getattr(dm, "ref_conv", None) is not None):
        return
    latent = n * patch[0] * patch[1] * patch[2] * int(getattr(dm, "out_dim", 16))  # one row's latent
    with torch.no_grad():
        for c, rows in capture.concept_rows(q.shape[0], cond_or_uncond):
            s = torch.cat([token_attention(q[r:r + 1, :n], k[r:r + 1], heads,
                                           _prompt_positions(capture, c, r - rows.start, k[r]), latent)
                           for r in range(rows.start, rows.stop)])  # (B, T' h w)
            capture.add(c, s.view(s.shape[0], frames, -1).mean(dim=1), heads)
    capture.layer_done(hw)

