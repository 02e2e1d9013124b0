"""The SEGA nodes as ComfyUI registers them: names, categories, tooltips, the paper's defaults."""
from __future__ import annotations

import re

import pytest

from harness.pack import concept_inputs

SEGA_NODES = ["SEGAConcept", "SEGAConceptText", "SEGAPrompt", "SEGAConceptStack", "SEGAApply", "SEGAGuider",
              "SEGAKSampler", "SEGASaveEdit", "SEGAReplayEdit", "SEGAInvertPhoto", "SEGAPhotoEdit", "SEGAPhotoGuider",
              "SEGAInversionSampler"]


@pytest.fixture(scope="module")
def registry(comfy_nodes):
    import nodes

    assert comfy_nodes.pack_imported, comfy_nodes.pack_error
    return nodes


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            yield name, value[0], (value[1] if len(value) > 1 else {})


def test_every_node_is_registered_with_name_and_category(registry, comfy_nodes):
    assert sorted(comfy_nodes.pack_nodes) == sorted(SEGA_NODES)
    for node_id in SEGA_NODES:
        cls = registry.NODE_CLASS_MAPPINGS[node_id]
        assert registry.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("SEGA"), node_id
        assert cls.CATEGORY == "sampling/sega", node_id
        assert getattr(cls, "DESCRIPTION", ""), node_id


def test_every_input_has_a_tooltip(registry):
    for node_id in SEGA_NODES:
        cls = registry.NODE_CLASS_MAPPINGS[node_id]
        for name, kind, options in _inputs(cls):
            if kind == "COMFY_AUTOGROW_V3":
                options = dict(options)
                template = options.get("template", {}).get("input", {})
                inner = [v for sec in template.values() for v in sec.values()]
                assert inner and all(len(v) > 1 and v[1].get("tooltip") for v in inner), (node_id, name)
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"


def _defaults(registry, node_id):
    return {name: options.get("default") for name, _, options in _inputs(registry.NODE_CLASS_MAPPINGS[node_id])}


def test_defaults_are_the_papers(registry):
    concept = _defaults(registry, "SEGAConcept")
    assert (concept["edit_scale"], concept["threshold"], concept["warmup"], concept["weight"],
            concept["direction"]) == (5.0, 0.9, 10, 1.0, "add")
    for node_id in ("SEGAApply", "SEGAGuider", "SEGAKSampler"):
        d = _defaults(registry, node_id)
        assert (d["momentum_scale"], d["momentum_beta"]) == (0.1, 0.4), node_id
    assert _defaults(registry, "SEGAGuider")["cfg"] == 7.5
    ks = _defaults(registry, "SEGAKSampler")
    assert (ks["cfg"], ks["steps"]) == (7.5, 50)


def _call(cls, **kwargs):
    out = cls.execute(**kwargs)
    return (getattr(out, "result", None) or out.args)[0]


def test_concepts_chain_and_stack_in_order(registry):
    concept_cls = registry.NODE_CLASS_MAPPINGS["SEGAConcept"]
    stack_cls = registry.NODE_CLASS_MAPPINGS["SEGAConceptStack"]
    settings = concept_inputs()  # the node's defaults
    a = _call(concept_cls, conditioning=[["a", {}]], label="a", **settings)
    ab = _call(concept_cls, conditioning=[["b", {}]], label="b", concepts=a, **settings)
    assert [c.label for c in ab] == ["a", "b"]
    c = _call(concept_cls, conditioning=[["c", {}]], label="c", **dict(settings, direction="remove", cooldown=7))
    stacked = _call(stack_cls, concepts={"concepts0": ab, "concepts1": c, "concepts10": a, "concepts2": None})
    assert [s.label for s in stacked] == ["a", "b", "c", "a"]
    assert stacked[2].concept.reverse and stacked[2].concept.cooldown == 7
    assert stacked[0].concept.cooldown is None  # the default (NEVER) means never, the reference's None


def test_concept_threshold_is_validated_before_running(registry):
    cls = registry.NODE_CLASS_MAPPINGS["SEGAConcept"]
    assert cls.validate_inputs(threshold=0.9) is True
    message = cls.validate_inputs(threshold=1.0)
    assert isinstance(message, str) and "SEGA Concept" in message and "threshold" in message


def _readme_tables() -> dict:
    """README's "Nodes and inputs": {heading: {input: default cell}} for every table under a heading."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Nodes and inputs\n", 1)[1].split("\n## ", 1)[0]
    tables, heading = {}, None
    for line in section.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("| `") and heading is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            names = re.findall(r"`([^`]+)`", cells[0])
            tables.setdefault(heading, {})[names[0]] = cells[1]
    return tables


def _same_default(cell: str, default) -> bool:
    cell = cell.strip("`").strip()
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return cell.strip('"') == str(default)
    try:
        return float(cell) == float(default)
    except ValueError:
        return False


def test_readme_lists_every_input_with_its_default(registry):
    """Each node has a table under a heading that is its display name, one row per input (an Autogrow
    input by its first slot), with the node's default."""
    tables = _readme_tables()
    for node_id in SEGA_NODES:
        name = registry.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert name in tables, f"README has no input table under a heading '{name}'"
        rows = tables[name]
        inputs = list(_inputs(registry.NODE_CLASS_MAPPINGS[node_id]))
        expected = [f"{n}0" if kind == "COMFY_AUTOGROW_V3" else n for n, kind, _ in inputs]
        assert sorted(rows) == sorted(expected), f"{name}: README rows {sorted(rows)}, inputs {sorted(expected)}"
        for (_, _, options), row in zip(inputs, expected):
            if options.get("default") is not None:
                assert _same_default(rows[row], options["default"]), \
                    f"{name}.{row}: README says {rows[row]!r}, the node's default is {options['default']!r}"
