"""Finds the ComfyUI host for the tests that need one.

Layers:
  tests/core/  pure torch; must never import ComfyUI (checked below).
  tests/host/  runs inside a real ComfyUI source tree; every test there is marked `host`.
Any other test that needs ComfyUI is marked `@pytest.mark.host` by hand.

The host is the first of: $COMFYUI_PATH; $HOME/ComfyUI; the folder above custom_nodes/ when this
pack sits in ComfyUI/custom_nodes/<pack> (harness.host.find_comfyui, the order run_sega.py, the
benchmarks and .ci/run use too). A host is a folder with comfy/ and nodes.py; it goes first on
sys.path (before this repo, whose nodes/ would otherwise shadow ComfyUI's nodes.py).
Without one, host tests are skipped and the summary says so in one line.

Host test modules import tests/host/comfy_host.py before anything from ComfyUI (it selects the
CPU when torch has no CUDA, through harness.host.prepare_host). Do not add an __init__.py to tests/: ComfyUI's own tree has a
`tests` package that would shadow it.
"""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

from harness.host import HostError, find_comfyui, host_version

TESTS_DIR = Path(__file__).resolve().parent
PACK_ROOT = TESTS_DIR.parent
CORE_DIR = TESTS_DIR / "core"
HOST_DIR = TESTS_DIR / "host"

NO_HOST_REASON = "no ComfyUI found"
NO_HOST_HELP = ("set COMFYUI_PATH to a ComfyUI source tree, "
                "or put this pack in ComfyUI/custom_nodes/")
# Top-level modules of a ComfyUI tree that tests/core must not import.
COMFY_MODULES = ("comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "execution")

_skipped_modules: list[str] = []


# At import, not in pytest_configure: conftest files below this one (tests/host/) can be loaded
# before pytest_configure runs, and they import comfy_host, which looks for ComfyUI on sys.path.
_host_error = ""
try:
    _host = find_comfyui()
except HostError as e:
    _host, _host_error = None, str(e)
if _host is not None and (not sys.path or sys.path[0] != str(_host)):
    sys.path.insert(0, str(_host))


def _imported_comfy() -> set[str]:
    return {m for m in sys.modules if m.split(".")[0] in COMFY_MODULES}


def _under(path, folder: Path) -> bool:
    try:
        Path(str(path)).resolve().relative_to(folder)
        return True
    except ValueError:
        return False


class _PackRootIsAPlainFolder:
    """pytest collects a folder holding __init__.py as a Package and imports that file before
    the tests below it run. The repo root is the pack itself, whose __init__.py imports ComfyUI:
    collect it as a plain folder. (A plugin, not a conftest hook: conftest hooks do not apply
    to the folder above their own.)"""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if path == PACK_ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    config.addinivalue_line("markers", "host: needs a real ComfyUI source tree (see tests/conftest.py)")
    if _host_error:
        raise pytest.UsageError(_host_error)
    config.pluginmanager.register(_PackRootIsAPlainFolder(), "sega-pack-root-is-a-plain-folder")


def pytest_report_header(config):
    if _host is None:
        return f"ComfyUI host: none ({NO_HOST_HELP})"
    return f"ComfyUI host: {_host} (ComfyUI {host_version(_host)})"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"{NO_HOST_REASON}: {NO_HOST_HELP}")
    for item in items:
        if _under(item.path, HOST_DIR):
            item.add_marker(pytest.mark.host)
        if _host is None and item.get_closest_marker("host"):
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    in_core = _under(collector.path, CORE_DIR)
    before = _imported_comfy() if in_core else set()
    report = yield
    if in_core and isinstance(collector, pytest.Module):
        new = _imported_comfy() - before
        if new and report.passed:
            report.outcome = "failed"
            report.longrepr = f"tests/core must not import ComfyUI; importing {collector.path.name} imported {sorted(new)}"
    if (_host is None and report.failed and isinstance(collector, pytest.Module)
            and _under(collector.path, HOST_DIR)
            and re.search(r"\b(ModuleNotFoundError|ImportError)\b", str(report.longrepr))):
        # A host module that imports ComfyUI at module level: a skip, not an error, without a host.
        _skipped_modules.append(collector.nodeid)
        report.outcome = "skipped"
        report.longrepr = (str(collector.path), 0, f"Skipped: {NO_HOST_REASON}: {NO_HOST_HELP}")
        report.result = []
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _host is not None and item.get_closest_marker("host"):
        importlib.import_module("comfy_host").prepare_host()  # the CPU, before ComfyUI loads


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    if not _under(item.path, CORE_DIR):
        return (yield)
    before = _imported_comfy()
    result = yield
    new = _imported_comfy() - before
    if new:
        raise AssertionError(f"tests/core must not import ComfyUI; this test imported {sorted(new)}")
    return result


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _host is not None:
        return
    tests = sum(1 for rep in terminalreporter.stats.get("skipped", [])
                if rep.when != "collect" and NO_HOST_REASON in str(getattr(rep, "longrepr", "")))
    if not tests and not _skipped_modules:
        return
    modules = f" and {len(_skipped_modules)} host modules" if _skipped_modules else ""
    terminalreporter.write_line(f"SKIPPED {tests} host tests{modules}: {NO_HOST_REASON} ({NO_HOST_HELP})",
                                yellow=True, bold=True)
