"""The steps in which a concept acts: sega_core.concept_acts (used by Plan.acts, Plan.rows and
sega_step) and its mirror in js/sega_window.js (the SEGA Concept node's label) agree on a table of
cases. The JavaScript runs in Node.js; without it the comparison is skipped."""
from __future__ import annotations

import base64
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.pack import NEVER  # the SEGA Concept node's cooldown that never stops (None in sega_core)
from sega_core import Concept, Plan, concept_acts

WINDOW_JS = Path(__file__).resolve().parents[2] / "js" / "sega_window.js"

# (warmup, cooldown or None, scale, weight): edges of the window, empty windows, off concepts
SETTINGS = [
    (0, None, 5.0, 1.0), (10, None, 5.0, 1.0), (3, 7, 5.0, 1.0), (3, 4, 5.0, 1.0), (3, 3, 5.0, 1.0),
    (5, 2, 5.0, 1.0), (0, 0, 5.0, 1.0), (0, 1, 5.0, 1.0), (2, 9, 0.0, 1.0), (2, 9, 5.0, 0.0),
    (2, 9, 5.0, -1.0), (2, 9, -3.0, 0.5), (0, None, 0.0, 0.0), (12, 30, 0.1, 10.0),
]
STEPS = range(0, 32)


def _node_json(script: str) -> object:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: js/sega_window.js cannot be run")
    # imported from a data: URL, so that any Node.js with ES modules loads it as one
    url = "data:text/javascript;base64," + base64.b64encode(WINDOW_JS.read_bytes()).decode("ascii")
    code = f"const js = await import({json.dumps(url)});\n{script}"
    done = subprocess.run([node, "--input-type=module", "-e", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _python_acts(step: int, warmup: int, cooldown, scale: float, weight: float) -> bool:
    acts = concept_acts(step, warmup, math.inf if cooldown is None else cooldown, scale, weight)
    # the Plan of a node's concept (a negative scale is the remove direction) says the same
    concept = Concept(scale=abs(scale), reverse=scale < 0, warmup=warmup, cooldown=cooldown, weight=weight)
    assert Plan.build([concept]).acts(step) == [acts]
    return acts


def _label(warmup: int, cooldown, scale: float, weight: float) -> str:
    """The label the node should show, read off the Python definition step by step."""
    if not any(concept_acts(t, warmup, math.inf, scale, weight) for t in STEPS):
        return "off"
    acting = [t for t in STEPS if _python_acts(t, warmup, cooldown, scale, weight)]
    if not acting:
        return "never acts"
    return f"steps {acting[0]}\u2192{'end' if cooldown is None else acting[-1] + 1}"


def test_js_concept_acts_agrees_with_sega_core():
    cases = [[t, w, c, s, g] for (w, c, s, g) in SETTINGS for t in STEPS]
    got = _node_json(f"""
        const cases = {json.dumps(cases)};
        const acts = ([t, w, c, s, g]) => js.conceptActs(t, w, c === null ? Infinity : c, s, g);
        console.log(JSON.stringify(cases.map(acts)));
    """)
    want = [_python_acts(*case) for case in cases]
    assert sum(want) > 0 and not all(want)  # the table holds both answers
    mismatches = [(case, g, w) for case, g, w in zip(cases, got, want) if g != w]
    assert not mismatches, f"(step, warmup, cooldown, scale, weight), JS, Python: {mismatches[:5]}"


def test_js_window_label_agrees_with_sega_core():
    widgets = [[s, g, w, NEVER if c is None else c] for (w, c, s, g) in SETTINGS]
    got = _node_json(f"""
        const cases = {json.dumps(widgets)};
        console.log(JSON.stringify(cases.map(([s, g, w, c]) => js.windowText(s, g, w, c))));
    """)
    want = [_label(w, c, s, g) for (w, c, s, g) in SETTINGS]
    assert {"off", "never acts"} <= set(want)
    assert got == want
    assert _node_json("console.log(JSON.stringify(js.windowText(5, 1, NaN, 3)))") is None


# window_unit "percent": (warmup, cooldown, scale, weight) in percent of the run's steps
PERCENT_SETTINGS = [
    (20, 80, 5.0, 1.0), (0, 100, 5.0, 1.0), (0, NEVER, 5.0, 1.0), (20, NEVER, 5.0, 1.0), (10, 150, 5.0, 1.0),
    (50, 50, 5.0, 1.0), (60, 40, 5.0, 1.0), (100, NEVER, 5.0, 1.0), (99, 100, 5.0, 1.0), (0, 1, 5.0, 1.0),
    (33, 34, 5.0, 1.0), (20, 80, 0.0, 1.0), (20, 80, 5.0, 0.0), (0, 0, 5.0, 1.0),
]


def _percent_label(warmup: int, cooldown: int, scale: float, weight: float) -> str:
    """The label the node should show with window_unit percent, read off sega_core: the concept as the
    node makes it (fractions of the schedule), its plan turned into steps of 1-100-step runs."""
    if not concept_acts(0, 0, math.inf, scale, weight):
        return "off"
    concept = Concept(scale=abs(scale), reverse=scale < 0, warmup=warmup / 100,
                      cooldown=None if cooldown >= 100 else cooldown / 100, weight=weight, window_unit="fraction")
    plan = Plan.build([concept])
    acting = {n: [i for i in range(n) if plan.for_steps(n).acts(i)[0]] for n in range(1, 101)}
    if not any(acting.values()):
        return "never acts"
    # in a 100-step run step i is i% of the schedule: the window's percent bounds are its steps
    steps = acting[100]
    end = steps[-1] + 1
    return f"{steps[0]}%\u2192{'end' if end == 100 else f'{end}%'}"


def test_js_percent_window_label_agrees_with_sega_core():
    cases = [[s, g, w, c] for (w, c, s, g) in PERCENT_SETTINGS]
    got = _node_json(f"""
        const cases = {json.dumps(cases)};
        console.log(JSON.stringify(cases.map(([s, g, w, c]) => js.windowText(s, g, w, c, "percent"))));
    """)
    want = [_percent_label(w, c, s, g) for (w, c, s, g) in PERCENT_SETTINGS]
    assert {"off", "never acts", "20%\u219280%", "20%\u2192end"} <= set(want)
    assert got == want
