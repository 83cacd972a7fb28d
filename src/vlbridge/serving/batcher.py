"""The dynamic batcher in front of the engine: concurrent jobs with equal keys (the same generation
settings) share one generate call.

A group becomes due when it holds max_batch_size jobs, when its first job has waited max_wait_s, or when
a generate call ends while it waits (its jobs gathered during that call: waiting longer would leave the
worker idle). Due groups run one at a time on the engine's worker thread, oldest first; while one runs,
the others keep taking jobs (up to max_batch_size), since their jobs would wait anyway: under load a
batch is as large as what arrived during the previous one. Streamed and plain jobs share groups; a job
whose client left before its group ran is dropped.
"""

from __future__ import annotations

import asyncio
import time

from vlbridge.serving.engine import Engine, Job, Result


class Batcher:
    def __init__(self, engine: Engine, max_batch_size: int, max_wait_s: float):
        self.engine, self.max_batch_size, self.max_wait_s = engine, max_batch_size, max_wait_s
        self.pending: dict[tuple, list[tuple[Job, asyncio.Future]]] = {}  # key -> its jobs, oldest first
        self.timers: dict[tuple, asyncio.TimerHandle] = {}
        self.due: list[tuple] = []  # keys of the groups that may run, in the order they became due
        self.busy = False  # a group is running

    async def submit(self, job: Job) -> Result:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        group = self.pending.setdefault(job.key, [])
        group.append((job, future))
        if len(group) >= self.max_batch_size:
            self._due(job.key)
        elif len(group) == 1:
            self.timers[job.key] = loop.call_later(self.max_wait_s, self._due, job.key)
        return await future

    def _due(self, key: tuple) -> None:
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self.pending and key not in self.due:
            self.due.append(key)
        self._next()

    def _next(self) -> None:
        """Start the oldest due group unless one is running; jobs past max_batch_size stay for the next."""
        if self.busy or not self.due:
            return
        key = self.due.pop(0)
        group = self.pending.pop(key)
        group, rest = group[: self.max_batch_size], group[self.max_batch_size :]
        if rest:  # they came while the worker was busy: due now if full or waited out, else at their time
            self.pending[key] = rest
            waited = time.monotonic() - rest[0][0].submitted
            if len(rest) >= self.max_batch_size or waited >= self.max_wait_s:
                self.due.append(key)
            else:
                self.timers[key] = asyncio.get_running_loop().call_later(self.max_wait_s - waited, self._due, key)
        self.busy = True
        asyncio.get_running_loop().create_task(self._run(group))

    async def _run(self, group):
        loop = asyncio.get_running_loop()
        try:
            group = [(j, f) for j, f in group if not f.done()]  # done already: cancelled, the client left
            if group:
                await self._generate(loop, group)
        finally:
            self.busy = False
            for key in list(self.pending):  # they gathered while the worker was busy: no reason to wait longer
                timer = self.timers.pop(key, None)
                if timer is not None:
                    timer.cancel()
                if key not in self.due:
                    self.due.append(key)
            self._next()

    async def _generate(self, loop, group):
        try:
            results = await loop.run_in_executor(self.engine.executor, self.engine.run, [j for j, _ in group])
        except Exception as e:  # the engine returns errors per job; this is a bug of ours
            results = [e] * len(group)
        for job, _ in group:
            if job.sink is not None:
                job.sink.abort()  # ended already unless generation failed: then its reader stops waiting
        for (_, future), result in zip(group, results):
            if future.done():  # the client went away
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
