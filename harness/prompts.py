"""Running API-format prompts with ComfyUI's own executor, in this process.

`execute_prompt(prompt)` validates and runs one prompt without a cache (every node executes).
`PromptRunner(cache=True)` runs prompts one after another through one executor with ComfyUI's
default cache, as the server's queue does (the loaded checkpoint is shared by every prompt), and
records which nodes executed. Both raise PromptValidationError / PromptExecutionError with
ComfyUI's message.
"""
from __future__ import annotations

import asyncio
import uuid


class PromptError(RuntimeError):
    """A prompt failed validation or execution; the message is ComfyUI's."""


class PromptValidationError(PromptError):
    """ComfyUI's validation refused the prompt; the message lists every node error."""


class PromptExecutionError(PromptError):
    """A node failed while the prompt ran; the message has the node, the exception and its traceback."""


class EventServer:
    """The few members of ComfyUI's PromptServer that the executor uses; keeps every event."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.events: list = []

    def send_sync(self, event, data, sid=None) -> None:
        self.events.append((event, data))


def validation_message(error: dict, node_errors: dict) -> str:
    """ComfyUI's validation error and every node error, one per line."""
    lines = [f"{error.get('message', error)}: {error.get('details', '')}".rstrip(": ")]
    for node_id, info in node_errors.items():
        for e in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details', '')}")
    return "\n".join(lines)


def validate(prompt: dict) -> tuple[str, list]:
    """(prompt id, output node ids) of a prompt ComfyUI's validation accepts; else PromptValidationError."""
    import execution

    prompt_id = uuid.uuid4().hex
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise PromptValidationError(validation_message(error, node_errors))
    return prompt_id, outputs


class PromptRunner:
    """Prompts run one after another through one PromptExecutor.

    cache=False: no cache, every node executes each time. cache=True: ComfyUI's default (classic)
    cache, as the server's queue has it. `executed` lists the node ids that executed in the last
    run (not taken from the cache); it is recorded when the runner has a client id, with which the
    executor reports each node it executes.
    """

    def __init__(self, cache: bool = False, client_id: str | None = None) -> None:
        import execution

        self.server = EventServer()
        cache_type = execution.CacheType.CLASSIC if cache else execution.CacheType.NONE
        self.executor = execution.PromptExecutor(self.server, cache_type=cache_type,
                                                 cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        self.client_id = client_id
        self.executed: list = []

    def run(self, prompt: dict) -> dict:
        """Validate and run `prompt`; returns the UI outputs by node id."""
        prompt_id, outputs = validate(prompt)
        self.server.events.clear()
        extra = {"client_id": self.client_id} if self.client_id else {}
        self.executor.execute(prompt, prompt_id, extra, outputs)
        events = list(self.executor.status_messages) + list(self.server.events)
        self.executed = [d.get("node") for e, d in events if e == "executing" and d.get("node") is not None]
        for event, data in events:
            if event == "execution_error":
                tb = "".join(data.get("traceback") or [])
                raise PromptExecutionError(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                                           f"{data.get('exception_type')}: {data.get('exception_message')}\n{tb}")
            if event == "execution_interrupted":
                raise PromptExecutionError(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})")
        if not self.executor.success or not any(event == "execution_success" for event, _ in events):
            raise PromptExecutionError(f"the prompt did not finish; events: {[e for e, _ in events]}")
        return self.executor.history_result["outputs"]


def execute_prompt(prompt: dict) -> dict:
    """Validate and run an API-format prompt without a cache; the UI outputs by node id
    (e.g. {"9": {"images": [{"filename": ...}]}})."""
    return PromptRunner().run(prompt)
