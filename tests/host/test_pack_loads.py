"""This pack, linked into custom_nodes/, imports on the host and registers its nodes."""
from comfy_host import PACK_ROOT


def test_pack_imports_and_registers_nodes(comfy_nodes):
    assert (PACK_ROOT / "__init__.py").is_file(), f"the pack has no __init__.py ({PACK_ROOT})"
    assert comfy_nodes.pack_error is None, comfy_nodes.pack_error
    assert comfy_nodes.pack_nodes, "the pack imported but registered no node"
