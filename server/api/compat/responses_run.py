"""One OpenAI response being produced (`ResponseRun`), and the runs of one server (`ResponseRuns`).

A run drives its generation in a task of its own, tied to no client. It writes every event of the
response to an append-only log, as the dicts OpenAI sends as server-sent events' ``data``
(``type``, ``sequence_number`` consecutive from 0, ...), and keeps the Response object current in
the store. Readers (`ResponseRun.events`) replay the log after a sequence number and then follow it
live, any number at once, nothing lost or repeated; `ResponseRun.cancel` closes the upstream and
settles the response ``cancelled`` with its output so far, `ResponseRun.stop` with an error
settles it ``failed`` with that error (a drain's deadline). The HTTP routes (a streamed or whole
``POST``, background responses, ``GET ?stream=true&starting_after=``) and the WebSocket mode all
start and read runs through `start_run`; none of them produces events itself.

In cluster mode a background run also mirrors its events into Redis
(`server.api.compat.responses_log`), so that another node can resume it. A run that nobody can
resume (not background) is forgotten when it ends; a finished background run
keeps its log for the store's TTL, and at most ``max_count`` of them are kept or running, so that
memory stays bounded. `ResponseRuns` is drained with the sessions (`server.shutdown.Drainer`):
new responses are refused by the dispatcher's drain check, running ones get the drain timeout to
end, and those still running then end ``failed`` (a retryable ``shutting_down``), stored so, with
their output so far. This module encodes no wire format and never reads a request.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, Final

from protocol.close import CloseCode
from protocol.errors import ErrorCode, SluiceError
from server.api import calls
from server.api.compat.openai_chat import refuse
from server.api.compat.responses_log import EventMirror, Orphans, SharedEventLog
from server.api.compat.responses_model import (
    Plan,
    ResponsesRequest,
    call_item,
    message_item,
    new_item_id,
    plan,
    usage,
)
from server.api.compat.responses_store import ResponseStore, StoredResponse, drop_expired
from server.backends.base import ToolCall
from server.dispatcher import Finished
from server.services import Services

__all__ = ["TERMINAL", "ResponseRun", "ResponseRuns", "start_run"]

# The events that end a response's stream (a cancelled one ends with no event of its own).
TERMINAL: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})
_DELTA: Final = "response.output_text.delta"
Opening = Coroutine[Any, Any, calls.Generation]


class _Draft:
    """One response's id, the request's echoed settings, and its output items so far."""

    def __init__(
        self, body: ResponsesRequest, run: Plan, key_id: str, input_items: list[dict[str, Any]]
    ) -> None:
        self.id = new_item_id("resp")
        self.body, self.run, self.key_id, self.input_items = body, run, key_id, input_items
        self.background = bool(body.background)
        self.created_at = int(time.time())
        self.model = body.model or ""
        self.output: list[dict[str, Any]] = []
        self.node = ""  # the cluster node running it, if background in cluster mode

    def view(
        self, status: str, finished: Finished | None = None, error: SluiceError | None = None
    ) -> dict[str, Any]:
        body = self.body
        text_format = (
            body.text.format.model_dump(by_alias=True, exclude_none=True)
            if body.text and body.text.format
            else None
        )
        cut = finished is not None and finished.finish_reason == "length"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "background": self.background,
            "error": {"code": "server_error", "message": error.message} if error is not None else None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {},
            "model": finished.model if finished is not None else self.model,
            "output": list(self.output),
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "reasoning": None,
            "store": body.store,
            "temperature": body.temperature if body.temperature is not None else 1.0,
            "text": {"format": text_format or {"type": "text"}},
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": self.run.tools,
            "top_p": body.top_p if body.top_p is not None else 1.0,
            "truncation": "disabled",
            "usage": usage(finished) if finished is not None else None,
        }

    def stored(self, view: dict[str, Any]) -> StoredResponse:
        """``view`` as stored, with the conversation to continue from."""
        turns = [*self.run.turns, *_turns(self.output)]
        running = view["status"] in ("queued", "in_progress")
        return StoredResponse(self.key_id, view, self.input_items, turns, self.node if running else "")


def _status(finished: Finished) -> str:
    return "incomplete" if finished.finish_reason == "length" else "completed"


def _turns(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output items as one assistant turn of the protocol (for ``previous_response_id``)."""
    text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
    calls_made = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in output
        if item["type"] == "function_call"
    ]
    if not text and not calls_made:
        return []
    turn: dict[str, Any] = {"role": "assistant", "content": text}
    return [{**turn, "tool_calls": calls_made}] if calls_made else [turn]


class ResponseRun:
    """One response being produced (see the module docstring). Read ``view`` for the Response
    object as last settled, `current` for it with the text so far."""

    def __init__(
        self,
        draft: _Draft,
        store: ResponseStore,
        on_done: Callable[[ResponseRun], None],
        mirror: EventMirror | None = None,
    ) -> None:
        self.id, self.key_id, self.background = draft.id, draft.key_id, draft.background
        self.view = draft.view("queued" if draft.background else "in_progress")
        self.log: list[dict[str, Any]] = []
        self.done = False
        self.error: SluiceError | None = None  # why it ended response.failed
        self._draft, self._store, self._on_done, self._mirror = draft, store, on_done, mirror
        self._waiters: list[asyncio.Future[None]] = []  # one per reader waiting at the end of the log
        self._task: asyncio.Task[None] | None = None
        # A task cancelled before its first step never runs its ``finally``: stop it from inside.
        self._started = self._stop_early = False
        self._failure: SluiceError | None = None  # what a stop with an error settles it with
        self._item_id, self._index, self._text = "", -1, list[str]()  # the open message item

    def start(self, opening: calls.Generation | Opening) -> None:
        self._task = asyncio.create_task(self._produce(opening), name=f"sluice response {self.id}")

    async def events(self, after: int = -1) -> AsyncIterator[dict[str, Any]]:
        """The events with ``sequence_number > after``: those logged, then live until the end.
        The dicts are shared with every reader: copy one before changing it."""
        async for batch in self.batches(after):
            for event in batch:
                yield event

    async def batches(self, after: int = -1) -> AsyncIterator[list[dict[str, Any]]]:
        """`events` as lists: whatever was logged since the reader's last batch, at once."""
        index = max(after + 1, 0)
        while True:
            if index < len(self.log):
                batch = self.log[index:]
                index += len(batch)
                yield batch
                continue
            if self.done:
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def current(self) -> dict[str, Any]:
        """The Response object now: as settled, or in progress with its text so far."""
        if self.done or self._index < 0:
            return self.view
        view = self._draft.view(self.view["status"])
        view["output"][self._index] = message_item(self._item_id, "".join(self._text), "in_progress")
        return view

    def stored(self) -> StoredResponse:
        """The response as it would be stored now (its view and the conversation to continue)."""
        return self._draft.stored(self.view)

    def stop(self, error: SluiceError | None = None) -> None:
        """Cancel the generation without waiting: it settles ``cancelled`` in its own task, or
        ``failed`` with ``error`` when one is given."""
        if self._task is None or self.done:
            return
        if self._failure is None:
            self._failure = error
        if self._started:
            self._task.cancel()
        else:
            self._stop_early = True

    async def cancel(self) -> dict[str, Any]:
        """Close the upstream, settle ``cancelled`` (unless it ended already): the final view."""
        self.stop()
        return await self.wait()

    async def wait(self) -> dict[str, Any]:
        """The final view, once the run has ended (waiting never cancels the run)."""
        if self._task is not None:
            await asyncio.wait({self._task})
        return self.view

    # -- producing --------------------------------------------------------------------------

    def _emit(self, kind: str, **fields: Any) -> None:
        self._publish({"type": kind, "sequence_number": len(self.log), **fields})

    def _publish(self, event: dict[str, Any]) -> None:
        self.log.append(event)
        if self._mirror is not None:
            self._mirror.add(event)
        self._wake()

    def _wake(self) -> None:
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():  # a reader cancelled while it waited
                    waiter.set_result(None)
            self._waiters.clear()

    async def _settle(self, view: dict[str, Any]) -> None:
        self.view = view
        if self._draft.body.store:
            await self._store.put(self.id, self._draft.stored(view))

    async def _produce(self, opening: calls.Generation | Opening) -> None:
        draft = self._draft
        generation: calls.Generation | None = None
        try:
            self._started = True
            if self._stop_early:
                raise asyncio.CancelledError
            self._emit("response.created", response=self.view)
            generation = opening if isinstance(opening, calls.Generation) else await opening
            draft.model = generation.model
            if draft.background:  # stored as queued until now
                await self._settle(draft.view("in_progress"))
            else:
                self.view = draft.view("in_progress")
            self._emit("response.in_progress", response=self.view)
            async for piece in generation.items():
                if isinstance(piece, str):
                    self._text_piece(piece)
                elif isinstance(piece, ToolCall):
                    if draft.run.rules.keep(piece):
                        self._close_text("completed")
                        self._call(piece)
                else:
                    status = _status(piece)
                    self._close_text(status)
                    await self._settle(draft.view(status, piece))
                    self._emit(f"response.{status}", response=self.view)
        except SluiceError as exc:
            await self._fail(exc)
        except asyncio.CancelledError:  # cancelled, or its client left: keep the output so far
            if self._failure is not None:  # stopped with an error (the drain's deadline)
                await self._fail(self._failure)
            else:
                self._settle_text("incomplete")
                await self._settle(draft.view("cancelled"))
        finally:
            if generation is not None:
                await generation.aclose()
            elif not isinstance(opening, calls.Generation):
                opening.close()  # cancelled before it ran, or it failed
            self.done = True
            if self._mirror is not None:
                self._mirror.end()
            self._wake()
            self._on_done(self)

    async def _fail(self, error: SluiceError) -> None:
        self.error = error
        if not self.log:  # stopped before it began
            self._emit("response.created", response=self.view)
        self._settle_text("incomplete")
        await self._settle(self._draft.view("failed", error=error))
        self._emit("response.failed", response=self.view)

    def _text_piece(self, piece: str) -> None:
        if not piece:
            return
        draft = self._draft
        opened = None
        if self._index < 0:
            self._item_id, self._index = new_item_id("msg"), len(draft.output)
            opened = message_item(self._item_id, "", "in_progress")
            draft.output.append({**opened, "content": []})
            self._emit("response.output_item.added", output_index=self._index, item=draft.output[self._index])
        if opened is not None:
            where = {"item_id": self._item_id, "output_index": self._index, "content_index": 0}
            self._emit("response.content_part.added", **where, part=opened["content"][0])
        self._text.append(piece)
        delta = {"type": _DELTA, "item_id": self._item_id, "output_index": self._index, "content_index": 0}
        self._publish({**delta, "logprobs": [], "sequence_number": len(self.log), "delta": piece})

    def _settle_text(self, status: str) -> dict[str, Any] | None:
        """The open message item, with its text so far, as it ends with ``status``."""
        if self._index < 0:
            return None
        item = message_item(self._item_id, "".join(self._text), status)
        self._draft.output[self._index] = item
        self._text.clear()
        return item

    def _close_text(self, status: str) -> None:
        item = self._settle_text(status)
        if item is None:
            return
        where = {"item_id": self._item_id, "output_index": self._index, "content_index": 0}
        self._emit("response.output_text.done", **where, text=item["content"][0]["text"], logprobs=[])
        self._emit("response.content_part.done", **where, part=item["content"][0])
        self._emit("response.output_item.done", output_index=self._index, item=item)
        self._index = -1

    def _call(self, call: ToolCall) -> None:
        draft = self._draft
        item_id, index = new_item_id("fc"), len(draft.output)
        item = call_item(item_id, call, "completed")
        draft.output.append(item)
        where = {"item_id": item_id, "output_index": index}
        opened = {**item, "status": "in_progress", "arguments": ""}
        self._emit("response.output_item.added", output_index=index, item=opened)
        self._emit("response.function_call_arguments.delta", **where, delta=call.arguments)
        self._emit("response.function_call_arguments.done", **where, name=call.name, arguments=call.arguments)
        self._emit("response.output_item.done", output_index=index, item=item)


class ResponseRuns:
    """The runs of one server by id, each visible to its owner only; bounded (module docstring)."""

    def __init__(
        self,
        store: ResponseStore,
        *,
        ttl_s: float,
        max_count: int,
        shared: SharedEventLog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.shared = store, shared  # shared: the event logs in Redis (cluster mode)
        self.node_id = ""  # this node's id in cluster mode: where other nodes send cancels
        self.orphans: Orphans | None = None  # settles dead nodes' responses (cluster mode)
        self.ttl_s, self.max_count, self._clock = ttl_s, max_count, clock
        self._running: dict[str, ResponseRun] = {}
        self._background = 0  # of the running ones
        # Finished background runs, by when they were finished: the first is the next to expire.
        self._kept: OrderedDict[str, tuple[float, ResponseRun]] = OrderedDict()

    def get(self, response_id: str, owner: str) -> ResponseRun | None:
        """The run, or None when it is unknown here, expired or another key's."""
        self._expire()
        run = self._running.get(response_id)
        if run is None:
            entry = self._kept.get(response_id)
            run = entry[1] if entry is not None else None
        return run if run is not None and run.key_id == owner else None

    # -- as the drain sees them (`server.seam.Drainable`) -------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def attached(self) -> bool:  # until the runs cut short have settled (stored)
        return bool(self._running)

    def goaway(self, reason: str, retry_after_ms: int) -> None:
        """Nothing to tell: new responses are refused by the dispatcher's drain check."""

    def fail_all(self, error: SluiceError) -> None:
        """End every running response ``failed`` with ``error`` (in its own task)."""
        for run in list(self._running.values()):
            run.stop(error)

    def finish_connection(self, code: CloseCode, reason: str) -> None:
        """Nothing to close: the runs hold no connection."""

    def forget(self, response_id: str) -> None:
        self._kept.pop(response_id, None)

    def add(self, run: ResponseRun) -> None:
        self._expire()
        if run.background:
            if self._background >= self.max_count:
                raise SluiceError(
                    ErrorCode.OVERLOADED, "too many background responses are running", retry_after_ms=1000
                )
            self._background += 1
        self._running[run.id] = run

    def finished(self, run: ResponseRun) -> None:
        self._running.pop(run.id, None)
        if run.background:
            self._background -= 1
            self._kept[run.id] = (self._clock() + self.ttl_s, run)
            while len(self._kept) > self.max_count:
                self._kept.popitem(last=False)

    def _expire(self) -> None:
        drop_expired(self._kept, self._clock())


async def start_run(
    services: Services,
    runs: ResponseRuns,
    key_id: str,
    body: ResponsesRequest,
    *,
    local: Mapping[str, StoredResponse] | None = None,
) -> ResponseRun:
    """Start the response ``body`` asks for. A refusal (a field, an unknown previous response, a
    model, the rate) raises here, before any event; a background response is admitted here and
    opens its generation in its run. A caller that is not background stops the run
    (`ResponseRun.stop`) when its client leaves. ``local``: ``key_id``'s responses a
    ``previous_response_id`` may name besides the stored ones (a WebSocket's own, unstored)."""
    if body.background and not body.store:
        raise refuse("store", "a background response must be stored (store: true)")
    previous: list[dict[str, Any]] = []
    earlier_items: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        earlier = (local or {}).get(body.previous_response_id)
        if earlier is None:
            earlier = await runs.store.get(body.previous_response_id, key_id)
        if earlier is None:
            raise refuse("previous_response_id", f"no stored response {body.previous_response_id!r}")
        previous = earlier.turns
        earlier_items = [*earlier.input_items, *earlier.response["output"]]
    planned = plan(body, previous)
    draft = _Draft(body, planned, key_id, [*earlier_items, *planned.input_items])
    mirror = None
    if runs.shared is not None and draft.background:
        tracked = await runs.shared.track(runs.node_id, draft.id, key_id)  # for `Orphans`
        mirror, draft.node = runs.shared.mirror(draft.id, tracked), runs.node_id
    run = ResponseRun(draft, runs.store, runs.finished, mirror)
    opening: calls.Generation | Opening
    if draft.background:
        services.dispatcher.admit(key_id)
        opening = calls.open_generation(services, key_id, planned.message, admit=False)
    else:
        opening = await calls.open_generation(services, key_id, planned.message)
        draft.model = opening.model
        run.view = draft.view("in_progress")
    try:
        if body.store:  # retrievable from the start
            await runs.store.put(run.id, draft.stored(run.view))
        runs.add(run)
    except BaseException:
        await opening.aclose() if isinstance(opening, calls.Generation) else opening.close()
        raise
    run.start(opening)
    return run
