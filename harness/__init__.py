"""The one harness that run_sega.py, the tests and the benchmarks share (never imported by ComfyUI).

  harness.host       finding ComfyUI (one order), preparing it for import, loading its nodes;
                     PACK_ROOT, CACHE_DIR
  harness.prompts    running an API-format prompt with ComfyUI's own executor
  harness.tiny       tiny random-weight models: the SD1.5 checkpoint file and in-memory models
  harness.pack       this pack imported as a package, node outputs unwrapped, RowCounter, the
                     SEGA Concept node's inputs (`concept_inputs`)
  harness.workflow   UI-format workflows as API prompts (run_sega.py's side-by-side prompt, quick runs)
  harness.reference  stand-ins that run diffusers' SEGA pipeline offline, and a torch port of its step
  harness.memory     a call's CPU allocations measured with torch.profiler (peak, largest)

The Registry zip holds only what run_sega.py imports (host, prompts, tiny, pack, workflow; see
.comfyignore); diffusers' pipelines with stand-in parts (reference.py, and LEDITS++'s
ledits_reference.py, ledits_shared.py, shared_unet.py) are for developing the pack.

Nothing here imports ComfyUI at module level: import `harness.host` and call `prepare_host()`
before anything from ComfyUI.
"""
