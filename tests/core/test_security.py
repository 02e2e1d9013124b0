"""Security audit of the pack's source: no code execution from data, no unsafe deserialisation, no shell,
and a frontend that shows user text only as text.

Python (parsed with ast; names resolved through the module's imports, so `import subprocess as sp`
or `from torch import load` do not hide a call), in every .py file outside tests/:
  - no eval, exec or compile (builtins);
  - no pickle-family import (pickle, marshal, shelve, dill, ...): they run code while loading;
  - torch.load only with weights_only=True; numpy.load never with allow_pickle;
  - no shell: os.system, os.popen, subprocess.getoutput, asyncio's shell, or shell= on subprocess;
  - in the code ComfyUI loads (not bench/, the developers' benchmarks, which load their own modules by
    name): no __import__ or importlib.import_module of a name computed at run time.
JavaScript (js/ and any other .js outside tests/, comments ignored): no innerHTML, outerHTML,
insertAdjacentHTML, document.write, createContextualFragment, srcdoc, eval, Function constructor or
string timers.

Each rule is shown to fire on a small snippet, so a scanner that flags nothing cannot pass.
"""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Dict, List

import pytest

PACK_ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {"node_modules", "venv", "__pycache__"}
# Dynamic imports are allowed here only: developer tools, never imported by ComfyUI (harness/ imports
# the pack by path for the tests and the benchmarks; run_sega.py uses it outside ComfyUI).
DEV_TOOLS = {"bench", "harness"}

CODE_FROM_DATA = {"eval", "exec", "compile", "builtins.eval", "builtins.exec", "builtins.compile"}
IMPORT_BY_NAME = {"__import__", "builtins.__import__", "importlib.import_module", "importlib.__import__"}
PICKLE_FAMILY = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
ALWAYS_SHELL = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
                "asyncio.create_subprocess_shell"}


def pack_files(suffix: str) -> List[Path]:
    """The pack's files ending in `suffix`, outside tests/ and hidden or environment folders."""
    found = []
    for folder, dirs, files in os.walk(PACK_ROOT):
        top = Path(folder) == PACK_ROOT
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d.endswith(".egg-info") or d in SKIP_DIRS
                                           or (top and d == "tests"))]
        found += [Path(folder) / f for f in files if f.endswith(suffix)]
    return sorted(found)


def _aliases(tree: ast.AST) -> Dict[str, str]:
    """Local name -> the dotted name it stands for, from every import of the module."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: Dict[str, str]) -> str:
    """`sp.run` -> "subprocess.run" after `import subprocess as sp`; "" for anything but a dotted name."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([aliases.get(node.id, node.id)] + attrs[::-1])


def _keyword(call: ast.Call, name: str):
    """The keyword argument `name` of `call`: its constant value, `...` if not a constant, or None if absent."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else ...
    return None


def python_findings(source: str, filename: str = "<snippet>", dynamic_imports: bool = False) -> List[str]:
    """Every rule broken by `source`, as "file:line: what". `dynamic_imports`: allow import by computed name."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []

    def flag(node, what):
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] in PICKLE_FAMILY:
                    flag(node, f"imports {module} (loading runs code)")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        if name in CODE_FROM_DATA:
            flag(node, f"calls {name}")
        elif name in IMPORT_BY_NAME:
            literal = node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            if not literal and not dynamic_imports:
                flag(node, f"{name} of a name computed at run time")
        elif name == "torch.load" and _keyword(node, "weights_only") is not True:
            flag(node, "torch.load without weights_only=True (unpickles)")
        elif name == "numpy.load" and _keyword(node, "allow_pickle") not in (None, False):
            flag(node, "numpy.load with allow_pickle")
        elif name in ALWAYS_SHELL:
            flag(node, f"calls {name} (a shell)")
        elif name.startswith("subprocess.") and _keyword(node, "shell") not in (None, False):
            flag(node, f"{name} with shell=")
    return found


JS_RULES = [
    (r"\b(innerHTML|outerHTML|insertAdjacentHTML|createContextualFragment|srcdoc)\b", "parses a string as HTML"),
    (r"\bdocument\s*\.\s*write(ln)?\b", "document.write"),
    (r"(?<![\w.$])eval\s*\(", "eval"),
    (r"(?<![\w.$])(new\s+)?Function\s*\(", "the Function constructor"),
    (r"\bset(Timeout|Interval)\s*\(\s*['\"`]", "a timer given code as a string"),
]


def strip_js_comments(text: str) -> str:
    """`text` without // and /* */ comments; string and template literals are kept (and still scanned)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in "'\"`":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            out.append(" ")
            i = n if j < 0 else j + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def js_findings(text: str, filename: str = "<snippet>") -> List[str]:
    code = strip_js_comments(text)
    found = []
    for pattern, what in JS_RULES:
        for m in re.finditer(pattern, code):
            found.append(f"{filename}:{code.count(chr(10), 0, m.start()) + 1}: {what} ({m.group(0).strip()})")
    return found


# --- the pack ------------------------------------------------------------------------------------------

def test_python_sources_are_clean():
    files = pack_files(".py")
    names = {p.relative_to(PACK_ROOT).as_posix() for p in files}
    expected = {"__init__.py", "run_sega.py", "nodes/__init__.py", "nodes/patch.py", "nodes/edit_files.py",
                "sega_core/guidance.py", "bench/sega_math.py"}
    assert expected <= names, f"the scan misses {sorted(expected - names)}"
    assert not any(n.startswith("tests/") for n in names)
    found = []
    for path in files:
        rel = path.relative_to(PACK_ROOT)
        found += python_findings(path.read_text(encoding="utf-8"), rel.as_posix(),
                                 dynamic_imports=rel.parts[0] in DEV_TOOLS)
    assert not found, "\n".join(found)


def test_frontend_shows_text_only_as_text():
    files = pack_files(".js")
    assert (PACK_ROOT / "js" / "sega_concept_window.js") in files
    found = []
    for path in files:
        found += js_findings(path.read_text(encoding="utf-8"), path.relative_to(PACK_ROOT).as_posix())
    assert not found, "\n".join(found)


# --- the scanner fires -----------------------------------------------------------------------------------

@pytest.mark.parametrize("source,what", [
    ("x = eval(text)", "calls eval"),
    ("exec(code, {})", "calls exec"),
    ("import builtins\nbuiltins.compile(src, 'f', 'exec')", "calls builtins.compile"),
    ("m = __import__(name)", "__import__ of a name computed"),
    ("import importlib as il\nil.import_module(f'pkg.{x}')", "importlib.import_module of a name computed"),
    ("import pickle", "imports pickle"),
    ("from marshal import loads", "imports marshal"),
    ("import shelve as s", "imports shelve"),
    ("import dill.settings", "imports dill.settings"),
    ("import torch\nsd = torch.load(path)", "torch.load without weights_only"),
    ("from torch import load\nsd = load(path, weights_only=False)", "torch.load without weights_only"),
    ("import torch as t\nsd = t.load(path, weights_only=flag)", "torch.load without weights_only"),
    ("import numpy as np\na = np.load(path, allow_pickle=True)", "numpy.load with allow_pickle"),
    ("import os\nos.system('ls')", "calls os.system"),
    ("from os import popen\npopen(cmd)", "calls os.popen"),
    ("import subprocess as sp\nsp.run(cmd, shell=True)", "subprocess.run with shell="),
    ("from subprocess import Popen\nPopen(cmd, shell=use_shell)", "subprocess.Popen with shell="),
    ("import subprocess\nsubprocess.getoutput('ls')", "calls subprocess.getoutput"),
])
def test_python_scanner_flags(source, what):
    found = python_findings(source)
    assert len(found) == 1 and what in found[0], found


def test_python_scanner_passes_safe_code():
    source = "\n".join([
        "import re, json, subprocess, importlib, torch",
        "import numpy as np",
        "from safetensors.torch import load_file",
        "pattern = re.compile('[a-z]+')",
        "data = json.loads(text)",
        "subprocess.run(['git', 'status'], check=True)",
        "subprocess.run(['ls'], shell=False)",
        "importlib.import_module('json')",
        "sd = torch.load(path, weights_only=True)",
        "a = np.load(path)",
        "spec.loader.exec_module(module)",  # the import system, not the builtin exec
        "model.eval()",
    ])
    assert python_findings(source) == []
    assert python_findings("importlib.import_module(name)", dynamic_imports=True) == []


@pytest.mark.parametrize("source", [
    "el.innerHTML = text;",
    "el['outerHTML'] = text;",
    "el.insertAdjacentHTML('beforeend', text);",
    "document.write(text);",
    "document.writeln(text);",
    "eval(text);",
    "const f = new Function('a', body);",
    "const f = Function(body);",
    "setTimeout('run()', 10);",
    "const range = document.createRange(); range.createContextualFragment(html);",
    "frame.srcdoc = text;",
    'const url = "http://host/x"; el.innerHTML = url;',  # // inside a string is no comment
    "/* a comment */ el.innerHTML = text; // after it",
])
def test_js_scanner_flags(source):
    assert len(js_findings(source)) == 1, js_findings(source)


def test_js_scanner_passes_safe_code():
    source = "\n".join([
        "// never el.innerHTML = text: the text is drawn on the canvas",
        "/* document.write(x) and eval(x) are not used */",
        "el.textContent = text;",
        "ctx.fillText(text, 0, 0);",
        "const url = 'http://host/';",
        "setTimeout(() => node.setDirtyCanvas(true), 0);",
        "const evaluate = retrieval(x); node.evaluated = 1;",
    ])
    assert js_findings(source) == []
