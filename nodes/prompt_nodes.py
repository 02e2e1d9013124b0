"""SEGA Prompt: the prompt and its concepts typed in one text box (sega_core/prompt_syntax.py); SEGA
Concept (text): one concept's text and settings in one node. Both encode as CLIP Text Encode does."""
from __future__ import annotations

from comfy_api.latest import io

from ..sega_core import Concept, SEGAValueError
from ..sega_core.prompt_syntax import TypedConcept, parse_prompt
from .concept_nodes import (Concepts, _chain, check_attention_tokens, check_threshold, concept_optional_inputs,
                            concept_settings_inputs, make_concept)
from .concept_spec import ConceptSpec
from .errors import SEGAError
from .schema import CATEGORY, schema

SYNTAX_TOOLTIP = (
    "The prompt, then one concept per line (or after ';'):\n"
    "  + glasses :6 @10-        add 'glasses', edit scale 6, from step 10 to the end\n"
    "  - (red hat:1.2) thr=0.95 w=0.5 @0.2-0.8   remove, threshold, weight, acting over 20-80% of the schedule\n"
    "Defaults are SEGA Concept's: :5 thr=0.9 w=1 @10-. '# ...' starts a comment line; '\\' makes + - ; : @ = # "
    "plain text. (word:1.2) weighting works as in CLIP Text Encode.")


def encode(clip, text: str) -> list:
    """The CONDITIONING CLIP Text Encode gives for `text` with this CLIP."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def word_tokens(clip, text: str) -> int:
    """How many word tokens CLIP's tokenizer makes of `text` (its first 77-token chunk): the tokens after
    the start token and before the end token, as tokenize('') shows those two for this CLIP (SDXL: its
    first encoder's). The positions attention_tokens 'words' sums."""
    tokens, blank = clip.tokenize(text), clip.tokenize("")
    name = next(iter(tokens))
    ids, empty = [t[0] for t in tokens[name][0]], [t[0] for t in blank[name][0]]

    def same(a, b) -> bool:
        return isinstance(a, int) and isinstance(b, int) and a == b  # an embedding's vector is a word

    has_start = len(empty) > 1 and same(ids[0], empty[0]) and not same(empty[0], empty[1])
    end = empty[1] if has_start else empty[0]
    words = ids[1:] if has_start else ids
    n = next((i for i, t in enumerate(words) if same(t, end)), len(words))
    return max(n, 1)


def concept_spec(clip, typed: TypedConcept, where: str) -> ConceptSpec:
    """A typed concept as the SEGA Concept node would make it from the same text and settings."""
    return ConceptSpec(conditioning=encode(clip, typed.text), concept=typed_concept(typed), label=typed.text)


def typed_concept(typed: TypedConcept) -> Concept:
    """The sega_core Concept of a typed concept: @10-30 is warmup 10, cooldown 30 in steps; @0.2-0.8 the
    window as fractions of the schedule (acting at step i of N when 0.2 <= i / N < 0.8), as SEGA Concept's
    window_unit percent with warmup 20, cooldown 80."""
    w = typed.window
    if w.fraction:
        start, end, unit = float(w.start), None if w.end is None else float(w.end), "fraction"
    else:
        start, end, unit = int(w.start), None if w.end is None else int(w.end), "steps"
    return Concept(scale=typed.scale, threshold=typed.threshold, warmup=start, cooldown=end, weight=typed.weight,
                   reverse=typed.reverse, window_unit=unit)


class SEGAPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SEGAPrompt",
            display_name="SEGA Prompt",
            category=CATEGORY,
            description="A prompt and its SEGA concepts typed in one box: '+ glasses' adds a concept, '- cars' "
                        "removes one. Gives the positive conditioning and the concepts for a SEGA sampler.",
            search_aliases=["sega prompt", "typed concepts", "semantic guidance prompt", "ledits prompt"],
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the model you sample with (from Load Checkpoint)."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip=SYNTAX_TOOLTIP),
                Concepts.Input("concepts", optional=True,
                               tooltip="Concepts to put before the typed ones (optional): wired SEGA Concept "
                                       "nodes or another SEGA Prompt."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive",
                                       tooltip="The prompt lines, encoded as CLIP Text Encode does."),
                Concepts.Output(display_name="concepts", tooltip="The typed concepts, after any chained ones."),
            ],
        )

    @classmethod
    def validate_inputs(cls, text=None):
        if isinstance(text, str):  # a linked text is checked when the node runs
            try:
                parse_prompt(text)
            except SEGAValueError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, clip, text, concepts=None) -> io.NodeOutput:
        if clip is None:
            raise SEGAError("SEGA Prompt: the clip input is empty; connect the CLIP output of Load Checkpoint.")
        try:
            parsed = parse_prompt(text)
        except SEGAValueError as e:
            raise SEGAError(str(e)) from None
        chain = _chain(concepts)
        specs = [concept_spec(clip, c, "SEGA Prompt") for c in parsed.concepts]
        return io.NodeOutput(encode(clip, parsed.prompt), chain + specs)


class SEGAConceptText(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SEGAConceptText",
            display_name="SEGA Concept (text)",
            category=CATEGORY,
            description="One semantic concept typed in a text box, with its settings (SEGA Concept's): the text is "
                        "encoded as CLIP Text Encode does with this CLIP. Chain several, or gather them in a "
                        "SEGA Concept Stack.",
            search_aliases=["sega concept text", "semantic guidance", "concept edit", "text concept"],
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the model you sample with (from Load Checkpoint)."),
                io.String.Input(
                    "text", multiline=True, dynamic_prompts=True,
                    tooltip="The concept, e.g. 'glasses' or 'red cars'. Encoded exactly as CLIP Text Encode "
                            "encodes it ((word:1.2) weighting, SDXL's two encoders and pooled output)."),
                *concept_settings_inputs(),
                *concept_optional_inputs(
                    label="A name for this concept in messages and previews (optional; empty: its text).",
                    chain="Concepts to chain before this one (optional): SEGA Concept, SEGA Concept (text) or "
                          "SEGA Prompt nodes, or a stack."),
            ],
            outputs=[Concepts.Output(display_name="concepts", tooltip="This concept, after any chained ones.")],
        )

    @classmethod
    def validate_inputs(cls, threshold=0.9):
        # as SEGA Concept's: only threshold is named, so ComfyUI keeps checking the other inputs' limits
        return check_threshold("SEGA Concept (text)", threshold)

    @classmethod
    def execute(cls, clip, text, edit_scale, direction, threshold, warmup, cooldown, weight, label="",
                concepts=None, mask=None, mask_from="implicit", window_unit="steps",
                attention_tokens="all") -> io.NodeOutput:
        if clip is None:
            raise SEGAError("SEGA Concept (text): the clip input is empty; connect the CLIP output of Load "
                            "Checkpoint.")
        if not isinstance(text, str) or not text.strip():
            raise SEGAError("SEGA Concept (text): the text is empty; type the concept (e.g. 'glasses').")
        check_attention_tokens("SEGA Concept (text)", attention_tokens)
        concept = make_concept("SEGA Concept (text)", edit_scale, direction, threshold, warmup, cooldown, weight,
                               mask_from, window_unit,
                               word_tokens(clip, text) if attention_tokens == "words" else None)
        return io.NodeOutput(_chain(concepts) + [ConceptSpec(
            conditioning=encode(clip, text), concept=concept, label=str(label or "").strip() or text.strip(),
            mask=mask)])
