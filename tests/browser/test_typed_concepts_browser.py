"""SEGA Prompt and the window badge in ComfyUI's frontend (the system's Chromium).

The frontend rewrites prompt boxes before queueing ({a|b} choices, // comments): SEGA Prompt's
text reaches the prompt as typed. The title badge of SEGA Concept and SEGA Concept (text) shows the
window in the unit used: "steps 10→end", or with window_unit percent "20%→80%" (what the canvas
draws, read from its fillText calls).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfy_browser import PACK_NAME, console_errors, open_page, why_no_browser

_missing = why_no_browser()
if _missing:
    pytest.skip(f"browser tests skipped: {_missing}", allow_module_level=True)

pytestmark = pytest.mark.host

EXAMPLE = Path(__file__).resolve().parents[2] / "workflows" / "13-typed-concepts-sega-prompt.json"


@pytest.fixture(scope="module")
def page_and_console(comfy_server, browser):
    console = []
    page = open_page(browser, comfy_server, console, viewport=(1600, 1000))
    page.evaluate("() => app.graph.clear()")
    yield page, console
    page.close()


def test_sega_prompt_text_reaches_the_prompt_as_typed(page_and_console, comfy_server):
    page, console = page_and_console
    wf = json.loads(EXAMPLE.read_text())
    typed = next(n for n in wf["nodes"] if n["type"] == "SEGAPrompt")["widgets_values"][0]
    assert "\n+ " in typed and "\n- " in typed and "\n# " in typed and "@0.2-" in typed
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", wf)
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    sega_prompt = [n for n in prompt.values() if n["class_type"] == "SEGAPrompt"]
    assert len(sega_prompt) == 1 and sega_prompt[0]["inputs"]["text"] == typed
    assert not console_errors(console, comfy_server.url)


BADGES_JS = """async (cases) => {
  const L = window.LiteGraph;
  app.graph.clear();
  const nodes = cases.map(([type, values], i) => {
    const node = L.createNode(type);
    app.graph.add(node);
    node.pos = [40 + 460 * (i % 3), 80 + 520 * Math.floor(i / 3)];
    for (const [name, v] of Object.entries(values)) node.widgets.find(w => w.name === name).value = v;
    return node;
  });
  const drawn = [];
  const fillText = CanvasRenderingContext2D.prototype.fillText;
  CanvasRenderingContext2D.prototype.fillText = function (text, ...rest) {
    drawn.push(String(text));
    return fillText.call(this, text, ...rest);
  };
  try {
    app.canvas.ds.scale = 0.5;
    app.graph.setDirtyCanvas(true, true);
    app.canvas.draw(true, true);
  } finally {
    CanvasRenderingContext2D.prototype.fillText = fillText;
  }
  return drawn;
}"""


def test_badge_shows_the_window_in_its_unit(page_and_console, comfy_server):
    page, _ = page_and_console
    try:
        comfy_server.get(f"/extensions/{PACK_NAME}/sega_concept_window.js")
    except OSError:
        pytest.skip("js/ is not served: the pack's __init__.py sets no WEB_DIRECTORY")
    cases = [
        ("SEGAConcept", {"warmup": 20, "cooldown": 80, "window_unit": "percent"}),
        ("SEGAConceptText", {"warmup": 30, "cooldown": 10000, "window_unit": "percent"}),
        ("SEGAConcept", {"warmup": 12, "cooldown": 10000, "window_unit": "steps"}),
        ("SEGAConceptText", {"warmup": 5, "cooldown": 9}),
        ("SEGAConcept", {"warmup": 100, "cooldown": 100, "window_unit": "percent"}),
    ]
    drawn = page.evaluate(BADGES_JS, [list(c) for c in cases])
    for want in ("20%\u219280%", "30%\u2192end", "steps 12\u2192end", "steps 5\u21929", "never acts"):
        assert want in drawn, (want, [t for t in drawn if "\u2192" in t or "acts" in t])
