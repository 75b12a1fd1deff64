"""A bounded store of background jobs (batch embeddings), polled by id until they finish.

`TaskStore.submit` starts a job as an asyncio task and returns its `Task` at once; the client
polls `TaskStore.get` (``GET /api/v1/tasks/{id}``). A finished job keeps its result, or its typed
error, for ``ttl_s`` after it ended, then it is forgotten (expired on every submit and get).

Bounds, so that no client can grow the server without limit: at most ``max_tasks`` jobs held at
once (running or finished, not yet expired) and at most ``max_texts`` texts across them (which
bounds the vectors held). Past either, `submit` refuses with ``overloaded`` and a
``retry_after_ms``: refusing is safe, dropping a finished job before its owner read it is not. A
job belongs to the key that submitted it: another key asking for it is told it does not exist.

Results are kept as float32 arrays (4 bytes a value) and turned into JSON only when read.
Nothing here knows about HTTP; `close` cancels the jobs still running (server shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from protocol.errors import ErrorCode, SluiceError

__all__ = ["EmbeddingBatch", "Task", "TaskStatus", "TaskStore"]

log = logging.getLogger("sluice.tasks")

TaskStatus = Literal["pending", "running", "completed", "failed"]
# What a refused submit tells the client to wait: about how long a batch job takes to run.
_RETRY_AFTER_MS = 2000


@dataclass(frozen=True, slots=True)
class EmbeddingBatch:
    """The result of a batch embeddings job."""

    model: str
    vectors: npt.NDArray[np.float32]  # one row per text


@dataclass(slots=True, eq=False)
class Task:
    """One job: its progress, and its result or error once it ended."""

    id: str
    key_id: str
    total: int
    created_at: float  # wall clock, seconds
    status: TaskStatus = "pending"
    done: int = 0  # texts embedded so far
    result: EmbeddingBatch | None = None
    error: SluiceError | None = None
    ended_at: float | None = None  # store clock

    def view(self) -> dict[str, Any]:
        """What ``GET /api/v1/tasks/{id}`` answers (JSON-ready)."""
        body: dict[str, Any] = {
            "task_id": self.id,
            "status": self.status,
            "created_at": self.created_at,
            "progress": {"done": self.done, "total": self.total},
        }
        if self.result is not None:
            vectors = self.result.vectors
            body["result"] = {
                "embeddings": vectors.tolist(),
                "model": self.result.model,
                "dimensions": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
            }
        if self.error is not None:
            error: dict[str, Any] = {
                "code": self.error.code.value,
                "message": self.error.message,
                "retryable": self.error.retryable,
            }
            if self.error.retry_after_ms is not None:
                error["retry_after_ms"] = self.error.retry_after_ms
            body["error"] = error
        return body


Job = Callable[[Task], Awaitable[EmbeddingBatch]]


class TaskStore:
    """The jobs of one app; see the module docstring."""

    def __init__(
        self,
        *,
        max_tasks: int = 256,
        max_texts: int = 65536,
        ttl_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_tasks < 1 or max_texts < 1 or ttl_s <= 0:
            raise ValueError("max_tasks, max_texts and ttl_s must be positive")
        self.max_tasks = max_tasks
        self.max_texts = max_texts
        self.ttl_s = ttl_s
        self._clock = clock
        self._tasks: dict[str, Task] = {}
        self._texts = 0
        self._jobs: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def held_texts(self) -> int:
        return self._texts

    def submit(self, key_id: str, total: int, job: Job) -> Task:
        """Start ``job`` for ``total`` texts; raises ``SluiceError(overloaded)`` when full."""
        self.expire()
        if total > self.max_texts:
            raise SluiceError(ErrorCode.INVALID_REQUEST, f"a batch may hold at most {self.max_texts} texts")
        if len(self._tasks) >= self.max_tasks or self._texts + total > self.max_texts:
            raise SluiceError(
                ErrorCode.OVERLOADED,
                "too many batch jobs are held; retry later",
                retry_after_ms=_RETRY_AFTER_MS,
            )
        task = Task(
            id="task_" + secrets.token_urlsafe(16), key_id=key_id, total=total, created_at=time.time()
        )
        self._tasks[task.id] = task
        self._texts += total
        runner = asyncio.create_task(self._run(task, job), name=f"sluice {task.id}")
        self._jobs.add(runner)
        runner.add_done_callback(self._jobs.discard)
        return task

    def get(self, task_id: str, key_id: str) -> Task | None:
        """The job ``task_id`` if it exists, has not expired and belongs to ``key_id``."""
        self.expire()
        task = self._tasks.get(task_id)
        if task is None or task.key_id != key_id:
            return None
        return task

    def expire(self) -> int:
        """Forget the jobs that ended more than ``ttl_s`` ago; how many."""
        now = self._clock()
        expired = [
            task
            for task in self._tasks.values()
            if task.ended_at is not None and now - task.ended_at >= self.ttl_s
        ]
        for task in expired:
            del self._tasks[task.id]
            self._texts -= task.total
        return len(expired)

    async def close(self) -> None:
        """Cancel the jobs still running and wait for them to end."""
        jobs = list(self._jobs)
        for runner in jobs:
            runner.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    async def _run(self, task: Task, job: Job) -> None:
        task.status = "running"
        try:
            task.result = await job(task)
            task.done = task.total
            task.status = "completed"
        except SluiceError as exc:
            task.error = exc
            task.status = "failed"
        except asyncio.CancelledError:
            task.error = SluiceError(ErrorCode.SHUTTING_DOWN, "the server stopped before this job finished")
            task.status = "failed"
            raise
        except Exception:
            log.exception("batch job failed", extra={"task": task.id})
            task.error = SluiceError.internal()
            task.status = "failed"
        finally:
            task.ended_at = self._clock()
