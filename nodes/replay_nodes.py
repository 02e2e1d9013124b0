"""SEGA Save Edit and SEGA Replay Edit: carry the edit found on one run to others.

The reference pipeline returns the edit it applied at every step and takes such a list back
(`sem_guidance`); these nodes do the same through files in ComfyUI's output folder.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from comfy_api.latest import io

from .edit_files import EditRecord, list_edit_files, resolve_edit_file
from .errors import SEGAError
from .patch import RECORD_KEY, RecordSpec
from .run_scaffold import RunScaffold, RunState
from .schema import CATEGORY, schema

log = logging.getLogger(__name__)
KEY = "sega_replay"
RUN_KEY = "sega_replay_run"


class SEGASaveEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SEGASaveEdit",
            display_name="SEGA Save Edit",
            category=CATEGORY,
            description="Saves the edit SEGA applies at each step of a run to a .safetensors file in ComfyUI's "
                        "output folder, to replay it on other seeds with SEGA Replay Edit.",
            search_aliases=["sega record", "record semantic guidance", "sem_guidance"],
            inputs=[
                io.Model.Input("model", tooltip="The model SEGA samples with: put this node before or after "
                                                "SEGA Apply, or feed its output to SEGA KSampler / SEGA Guider."),
                io.String.Input("filename_prefix", default="sega/edit",
                                tooltip="File name in ComfyUI's output folder (subfolders allowed, no '..'); "
                                        "a number is added, as for images."),
            ],
            outputs=[io.Model.Output(tooltip="The same model; each SEGA run with it saves its edit.")],
        )

    @classmethod
    def execute(cls, model, filename_prefix) -> io.NodeOutput:
        from .edit_files import _check_relative

        _check_relative(filename_prefix, "SEGA Save Edit", "filename_prefix")
        m = model.clone()
        m.model_options[RECORD_KEY] = RecordSpec(filename_prefix)
        return io.NodeOutput(m)


class SEGAReplayEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="SEGAReplayEdit",
            display_name="SEGA Replay Edit",
            category=CATEGORY,
            description="Adds a saved SEGA edit (from SEGA Save Edit) to every step of another run, e.g. another "
                        "seed, without computing the concepts again.",
            search_aliases=["sega replay", "replay semantic guidance", "sem_guidance"],
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with; any sampler node can use the result."),
                io.Combo.Input("edit_file", options=list_edit_files(),
                               tooltip="A file saved by SEGA Save Edit, from ComfyUI's output or input folder. "
                                       "The run must have as many steps and the same latent size."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.05, round=0.001,
                               tooltip="Multiplies the saved edit: 1 replays it as recorded, 0 turns it off, "
                                       "negative values push the other way."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the edit replayed at every step.")],
        )

    @classmethod
    def execute(cls, model, edit_file, strength) -> io.NodeOutput:
        if not math.isfinite(strength):
            raise SEGAError(f"SEGA Replay Edit: strength must be a finite number, got {strength}.")
        record = EditRecord.load(resolve_edit_file(edit_file))
        m = model.clone()
        _Replay.remove_from(m)
        if strength == 0:
            return io.NodeOutput(m)
        _Replay(record, float(strength), edit_file).install(m)
        return io.NodeOutput(m)


class _Replay(RunScaffold):
    """A saved edit, added at every step of a run (a newer replay on the model replaces it)."""

    KEY = KEY
    RUN_KEY = RUN_KEY
    POST_CFG_MARK = "sega_replay"

    def __init__(self, record: EditRecord, strength: float, name: str):
        self.record = record
        self.strength = strength
        self.name = name

    def start_run(self, guider, noise: torch.Tensor, sigmas: torch.Tensor) -> RunState:
        steps, recorded = len(sigmas.flatten()) - 1, len(self.record.sigmas) - 1
        if steps != recorded:
            raise SEGAError(f"SEGA Replay Edit: {self.name} holds {recorded} steps but this run has {steps}; "
                            f"sample with {recorded} steps (and the same denoise) to replay it.")
        shape, saved = list(noise.shape), self.record.shape
        if shape[1:] != saved[1:] or saved[0] not in (1, shape[0]):
            raise SEGAError(f"SEGA Replay Edit: {self.name} was recorded on a latent of shape {saved}, this run's "
                            f"is {shape}; use the same size (one recorded image replays on any batch).")
        return RunState(self, sigmas)

    def edit(self, run: RunState, args: dict, sigma: torch.Tensor) -> Optional[torch.Tensor]:
        edit = self.record.term(run.clock.step_for(args["sigma"]), args["denoised"])
        return None if edit is None else self.strength * edit
