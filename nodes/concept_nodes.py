"""SEGA Concept and SEGA Concept Stack: build the list of concepts a SEGA sampler uses."""
from __future__ import annotations

from comfy_api.latest import io

from ..sega_core import Concept, SEGAValueError
from ..sega_core.concepts import MASK_FROM
from .concept_spec import SEGA_CONCEPTS, ConceptSpec
from .errors import SEGAError
from .schema import CATEGORY, schema

Concepts = io.Custom(SEGA_CONCEPTS)
NEVER = 10000  # cool-down value that never triggers (the reference's None)
WINDOW_UNITS = ("steps", "percent")  # the window_unit input: how warmup and cooldown count
ATTENTION_TOKENS = ("all", "words")  # the attention_tokens input: which text tokens the attention mask sums


def concept_settings_inputs() -> list:
    """The inputs of a concept's settings, shared by SEGA Concept and SEGA Concept (text): edit_scale,
    direction, threshold, warmup, cooldown and weight, in this order (saved workflows keep it)."""
    return [
        io.Float.Input(
            "edit_scale", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
            tooltip="How strongly the concept is pushed (edit guidance scale s_e). 0 turns the concept "
                    "off; the paper uses 3 to 10 (default 5). Too high burns the image."),
        io.Combo.Input(
            "direction", options=["add", "remove"], default="add",
            tooltip="add: steer the image towards the concept (glasses, smile). remove: steer away from "
                    "it (cars, text); the reference's reverse_editing_direction."),
        io.Float.Input(
            "threshold", default=0.9, min=0.0, max=0.999, step=0.001, round=0.001,
            tooltip="Keeps only the strongest part of the edit: 0.9 keeps the top 10% of positions per "
                    "channel, so the rest of the image stays. 0 keeps everything; the paper uses "
                    "0.9 to 0.95. Must be below 1."),
        io.Int.Input(
            "warmup", default=10, min=0, max=NEVER,
            tooltip="Sampler steps of this run before the concept acts (0-based, counted like the "
                    "reference's edit_warmup_steps: 10 of 50 steps = the paper's default). The "
                    "composition forms first, then the concept is edited in. 0 starts at once. With "
                    "window_unit percent: percent of the run's steps (20 = after a fifth)."),
        io.Int.Input(
            "cooldown", default=NEVER, min=0, max=NEVER,
            tooltip="Sampler step of this run from which the concept stops acting (the reference's "
                    "edit_cooldown_steps). Any value at or past the run's last step never stops it "
                    "(the default 10000 = never). Its rows are then skipped, saving time. With window_unit "
                    "percent: percent of the run's steps (100 or more = never)."),
        io.Float.Input(
            "weight", default=1.0, min=0.0, max=10.0, step=0.01, round=0.001,
            tooltip="Relative weight of this concept among several (edit weight). 1 is neutral; 0 "
                    "turns it off."),
    ]


def concept_optional_inputs(label: str, chain: str) -> list:
    """The optional inputs of SEGA Concept and SEGA Concept (text), in their order: label, concepts,
    mask, mask_from, window_unit, attention_tokens (the last three added later, each after the others,
    so saved workflows keep loading)."""
    return [
        io.String.Input("label", default="", optional=True, tooltip=label),
        Concepts.Input("concepts", optional=True, tooltip=chain),
        io.Mask.Input(
            "mask", optional=True,
            tooltip="Where this concept may edit (optional): 1 inside, 0 outside, soft values "
                    "(a feathered or blurred mask) fade the edit. Resized to the latent. The concept's "
                    "threshold is still taken over the whole image, so a small mask keeps little: "
                    "lower the threshold (e.g. 0.5) to edit more inside it. Empty: the whole image."),
        mask_from_input(),
        window_unit_input(),
        attention_tokens_input(),
    ]


def mask_from_input() -> io.Combo.Input:
    """SEGA Concept's and SEGA Concept (text)'s mask_from input (optional, before window_unit)."""
    return io.Combo.Input(
        "mask_from", options=list(MASK_FROM), default="implicit", optional=True,
        tooltip="Where the concept acts. implicit (default): where its own edit is strongest "
                "(the threshold above). attention: where the image attends to the concept's text "
                "(LEDITS++'s cross-attention mask, the top 1 - threshold of it; SD 1.x, 2.x, SDXL, "
                "SD3, Flux and Wan). intersect: both at once, LEDITS++'s default (on SD 1.x/2.x only below "
                "timestep 800, attention alone before). attention and intersect compute the "
                "concept's attention map at a few layers: a little slower.")


def window_unit_input() -> io.Combo.Input:
    """The last optional input of SEGA Concept and SEGA Concept (text)."""
    return io.Combo.Input(
        "window_unit", options=list(WINDOW_UNITS), default="steps", optional=True,
        tooltip="How warmup and cooldown count. steps (default): sampler steps of the run. percent: percent of "
                "the run's steps, so the window survives a change of step count (warmup 20, cooldown 80 acts "
                "from 20% to 80% of the schedule: steps 10-39 of 50, 4-15 of 20; cooldown 100 or more: to "
                "the end). It acts at step i of N when warmup <= 100 i / N < cooldown, N counting from "
                "start_at_step's step 0, like ConditioningSetTimestepRange and ControlNet's start/end percent.")


def attention_tokens_input() -> io.Combo.Input:
    """The last optional input of SEGA Concept and SEGA Concept (text)."""
    return io.Combo.Input(
        "attention_tokens", options=list(ATTENTION_TOKENS), default="all", optional=True,
        tooltip="Which tokens of the concept's text the attention mask sums (mask_from attention or intersect, "
                "SD 1.x, 2.x and SDXL). all (default): as LEDITS++, the 75 positions after CLIP's start token: "
                "the words, the end token and the padding. words: only the concept's own word tokens, so the "
                "mask follows the words alone. Only SEGA Concept (text) knows the words; SEGA Concept, fed a "
                "CONDITIONING, refuses words. Other models sum every text token either way.")


def make_concept(node: str, edit_scale, direction, threshold, warmup, cooldown, weight, mask_from="implicit",
                 window_unit="steps", mask_words=None) -> Concept:
    """The sega_core Concept of a SEGA Concept node's settings (checked again by the sampler's plan)."""
    if direction not in ("add", "remove"):
        raise SEGAError(f"{node}: direction must be 'add' or 'remove', got {direction!r}.")
    if mask_from not in MASK_FROM:
        raise SEGAError(f"{node}: mask_from must be one of {', '.join(MASK_FROM)}, got {mask_from!r}.")
    if window_unit not in WINDOW_UNITS:
        raise SEGAError(f"{node}: window_unit must be one of {', '.join(WINDOW_UNITS)}, got {window_unit!r}.")
    if window_unit == "percent":
        if not 0 <= warmup <= 100:
            raise SEGAError(f"{node}: warmup is a percent of the run's steps (window_unit percent): 0 to 100, "
                            f"got {warmup}.")
        start, end, unit = warmup / 100.0, None if cooldown >= 100 else cooldown / 100.0, "fraction"
    else:
        start, end, unit = int(warmup), None if cooldown >= NEVER else int(cooldown), "steps"
    return Concept(scale=float(edit_scale), threshold=float(threshold), warmup=start, cooldown=end,
                   weight=float(weight), reverse=direction == "remove", mask_from=mask_from, window_unit=unit,
                   mask_words=mask_words)


def check_attention_tokens(node: str, attention_tokens) -> None:
    if attention_tokens not in ATTENTION_TOKENS:
        raise SEGAError(f"{node}: attention_tokens must be one of {', '.join(ATTENTION_TOKENS)}, "
                        f"got {attention_tokens!r}.")


def _chain(concepts) -> list:
    if concepts is None:
        return []
    if not isinstance(concepts, (list, tuple)) or not all(isinstance(c, ConceptSpec) for c in concepts):
        raise SEGAError("SEGA: the concepts input must come from a SEGA Concept or SEGA Concept Stack node.")
    return list(concepts)


def check_threshold(node: str, threshold) -> "bool | str":
    """A concept node's validate_inputs answer for `threshold`: True, or sega_core's message (the one
    the samplers give for a concept made in Python)."""
    if not isinstance(threshold, (int, float)):
        return f"{node}: threshold must be a number, got {threshold!r}."
    try:
        Concept(threshold=threshold).validate(node)
    except SEGAValueError as e:
        return str(e)
    return True


class SEGAConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SEGAConcept",
            display_name="SEGA Concept",
            category=CATEGORY,
            description=(
                "One semantic concept to add to or remove from the image (SEGA, Brack et al. 2023). "
                "Encode the concept's text with the same CLIP as the prompt."),
            search_aliases=["semantic guidance", "sega", "concept edit", "edit concept"],
            inputs=[
                io.Conditioning.Input(
                    "conditioning",
                    tooltip="The concept's text, encoded with the CLIP of the model you sample with "
                            "(CLIP Text Encode). Prompt weighting and SDXL's pooled output work as usual."),
                *concept_settings_inputs(),
                *concept_optional_inputs(
                    label="A name for this concept in messages and previews (optional, e.g. 'glasses').",
                    chain="Concepts to chain before this one (optional): lets you wire SEGA Concept nodes "
                          "in a row instead of using a SEGA Concept Stack."),
            ],
            outputs=[Concepts.Output(display_name="concepts", tooltip="This concept, after any chained ones.")],
        )

    @classmethod
    def validate_inputs(cls, threshold=0.9):
        # Only `threshold` is named, and no **kwargs: ComfyUI skips its own min/max and option checks
        # for every input a validate_inputs takes, so edit_scale, weight, warmup, cooldown and
        # direction stay checked by ComfyUI (a shared workflow with edit_scale 1e6 is refused).
        return check_threshold("SEGA Concept", threshold)

    @classmethod
    def execute(cls, conditioning, edit_scale, direction, threshold, warmup, cooldown, weight,
                label="", concepts=None, mask=None, mask_from="implicit", window_unit="steps",
                attention_tokens="all") -> io.NodeOutput:
        check_attention_tokens("SEGA Concept", attention_tokens)
        if attention_tokens == "words":
            # CLIP Text Encode's CONDITIONING holds the tokens' embeddings only (SD 1.x/SDXL's CLIP
            # returns no attention mask or token count with it)
            raise SEGAError(
                "SEGA Concept: attention_tokens 'words' needs the number of the concept's word tokens, which a "
                "CONDITIONING from CLIP Text Encode does not carry. Type the concept in SEGA Concept (text) "
                "(the same settings, with its own text box), or set attention_tokens to 'all'.")
        # the settings are validated once, with the others, when a sampler node builds its plan
        concept = make_concept("SEGA Concept", edit_scale, direction, threshold, warmup, cooldown, weight, mask_from,
                               window_unit)
        return io.NodeOutput(_chain(concepts) + [ConceptSpec(
            conditioning=conditioning,
            concept=concept,
            label=str(label or "").strip(),
            mask=mask,
        )])


class SEGAConceptStack(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        template = io.Autogrow.TemplatePrefix(
            Concepts.Input("concepts", tooltip="A SEGA Concept (or another stack). A new slot appears "
                                               "when you connect one."),
            prefix="concepts", min=1, max=32)
        return schema(
            node_id="SEGAConceptStack",
            display_name="SEGA Concept Stack",
            category=CATEGORY,
            description="Gathers any number of SEGA concepts, in order, for a SEGA sampler, guider or Apply node.",
            search_aliases=["sega stack", "semantic guidance concepts"],
            inputs=[io.Autogrow.Input(
                "concepts", template=template,
                tooltip="Connect SEGA Concept nodes; a new input appears for each one you connect.")],
            outputs=[Concepts.Output(display_name="concepts", tooltip="All connected concepts, top to bottom.")],
        )

    @classmethod
    def execute(cls, concepts: io.Autogrow.Type = None) -> io.NodeOutput:
        if not concepts:
            # newer ComfyUI refuses an unconnected stack before running; older ones call it with nothing
            raise SEGAError("SEGA Concept Stack: nothing is connected to its concepts input; connect a SEGA "
                            "Concept, or remove the stack (a sampler with no concepts samples plain CFG).")
        out = []
        for name in sorted((concepts or {}), key=lambda n: int(n[len("concepts"):] or 0)):
            out += _chain(concepts[name])
        return io.NodeOutput(out)
