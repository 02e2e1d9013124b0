"""SEGA Prompt's typed concept syntax (sega_core/prompt_syntax.py): what it reads, what it refuses."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from sega_core import SEGAValueError
from sega_core.prompt_syntax import ParsedPrompt, TypedConcept, Window, parse_prompt, render_prompt

C = TypedConcept
STEP10 = Window()  # the wired node's default: from step 10 to the end

VALID = [
    ("a cat", ParsedPrompt("a cat", ())),
    ("a portrait photo of a woman, natural light\n+ glasses :6 @10-\n- (red hat:1.2) :5 thr=0.95 w=0.5 @0.2-0.8",
     ParsedPrompt("a portrait photo of a woman, natural light", (
         C("glasses", scale=6.0),
         C("(red hat:1.2)", reverse=True, threshold=0.95, weight=0.5, window=Window(0.2, 0.8, True))))),
    ("a street\n- cars; - people :3", ParsedPrompt("a street", (C("cars", True), C("people", True, scale=3.0)))),
    ("a street; +cars", ParsedPrompt("a street", (C("cars"),))),
    ("a; b", ParsedPrompt("a; b", ())),
    ("# a comment\nphoto\n  # indented comment\n+ smile", ParsedPrompt("photo", (C("smile"),))),
    ("+ glasses @0-", ParsedPrompt("", (C("glasses", window=Window(0, None, False)),))),
    ("+ glasses @-20", ParsedPrompt("", (C("glasses", window=Window(0, 20, False)),))),
    ("+ glasses @5-20", ParsedPrompt("", (C("glasses", window=Window(5, 20, False)),))),
    ("+ glasses @.5-", ParsedPrompt("", (C("glasses", window=Window(0.5, None, True)),))),
    ("+ glasses @0-0.5", ParsedPrompt("", (C("glasses", window=Window(0.0, 0.5, True)),))),
    ("+ glasses threshold=0 weight=2 :0", ParsedPrompt("", (C("glasses", scale=0.0, threshold=0.0, weight=2.0),))),
    ("+ a big  red hat   :4", ParsedPrompt("", (C("a big  red hat", scale=4.0),))),
    (r"\- not a concept", ParsedPrompt("- not a concept", ())),
    (r"\# not a comment", ParsedPrompt("# not a comment", ())),
    (r"+ e\=mc2 \:) smiley\; x", ParsedPrompt("", (C("e=mc2 :) smiley; x"),))),
    (r"a \(bracket\) prompt, embedding:name", ParsedPrompt(r"a \(bracket\) prompt, embedding:name", ())),
    ("{red|blue} car // kept for the frontend", ParsedPrompt("{red|blue} car // kept for the frontend", ())),
    ("first line\nsecond line\r\n+ x", ParsedPrompt("first line\nsecond line", (C("x"),))),
    ("+ x;", ParsedPrompt("", (C("x"),))),
]


@pytest.mark.parametrize("text,expected", VALID, ids=[t[:30] for t, _ in VALID])
def test_valid(text, expected):
    assert parse_prompt(text) == expected
    assert parse_prompt(render_prompt(expected)) == expected


INVALID = [
    ("photo\n+ glasses\n- (red hat:1.2) :5 thr=1.5", "SEGA Prompt, line 3 col 20: 'thr=1.5' is outside [0, 1)"),
    ("+", "line 1 col 1: '+' needs the concept's text after it"),
    ("- :5", "line 1 col 1: '-' needs the concept's text after it"),
    ("+ cat :5 big", "line 1 col 10: found 'big' after the concept's settings"),
    ("+ cat :x", "line 1 col 7: ':x': the edit scale must be a number, got 'x'"),
    ("+ cat :-2", "':-2': the edit scale must be a number"),
    ("+ cat :101", "':101' is outside [0, 100]"),
    ("+ cat w=11", "'w=11' is outside [0, 10]"),
    ("+ cat thr=1", "'thr=1' is outside [0, 1)"),
    ("+ cat foo=1", "'foo=1': unknown setting 'foo'"),
    ("+ cat :2 :3", "line 1 col 10: ':3' sets the scale a second time"),
    ("+ cat @5-2", "'@5-2' ends before it starts"),
    ("+ cat @-", "'@-' gives neither a start nor an end"),
    ("+ cat @5", "'@5' is not a step window"),
    ("+ cat @0.5-3", "'@0.5-3' is outside [0, 1]"),
    ("+ cat; photo", "line 1 col 8: found 'photo' after a ';' that follows a concept"),
]


@pytest.mark.parametrize("text,message", INVALID, ids=[t for t, _ in INVALID])
def test_invalid(text, message):
    with pytest.raises(SEGAValueError) as e:
        parse_prompt(text)
    assert message in str(e.value)
    assert str(e.value).startswith("SEGA Prompt, line ")


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab +-;:@=#\\.0123456789\n()tw rh{|}/")), max_size=60))
def test_any_text_parses_or_raises_the_pack_error(text):
    try:
        parsed = parse_prompt(text)
    except SEGAValueError as e:
        assert str(e).startswith("SEGA Prompt, line ")
        return
    assert parse_prompt(render_prompt(parsed)) == parsed


_words = st.text(alphabet=st.sampled_from(list("abc +-;:@=#\\()")), min_size=1, max_size=12)
_concepts = st.builds(
    TypedConcept,
    text=_words.map(str.strip).filter(bool),
    reverse=st.booleans(),
    scale=st.sampled_from([0.0, 2.5, 5.0, 7.0]),
    threshold=st.sampled_from([0.0, 0.5, 0.9, 0.95]),
    weight=st.sampled_from([0.0, 1.0, 0.25]),
    window=st.one_of(
        st.just(STEP10),
        st.builds(lambda a, n: Window(a, None if n is None else a + n, False),
                  st.integers(0, 50), st.one_of(st.none(), st.integers(1, 50))),
        st.builds(lambda a, b: Window(a, b, True), st.sampled_from([0.0, 0.25]), st.sampled_from([None, 0.5, 1.0])),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab ;#+-:\\")), max_size=20), st.lists(_concepts, max_size=4))
def test_render_then_parse_gives_the_same_concepts(prompt, concepts):
    prompt = "\n".join(line.strip() for line in prompt.split("\n")).strip()
    parsed = ParsedPrompt(prompt, tuple(concepts))
    assert parse_prompt(render_prompt(parsed)) == parsed
