"""Continuous-batching scheduler with chunked prefill under a token budget.

Each step:
  1. decoding requests first (one token each), oldest first;
  2. then running requests still in prefill continue with a chunk;
  3. then waiting requests are admitted (up to ``max_num_seqs`` running) with a chunk each,
until ``max_num_batched_tokens`` is used. A chunk needs KV blocks for its tokens. When a running
request cannot get them, the newest running request that is not in this step's batch is preempted
(its blocks are freed and it is recomputed later: prompt + outputs prefilled again). Waiting
requests never preempt: they wait until blocks are free.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from workers.engine.block_manager import BlockManager
from workers.engine.request import Request, Status


@dataclass(frozen=True)
class Chunk:
    """Tokens ``start``..``end``-1 of ``req`` go through the model this step."""

    req: Request
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's last token: its logits give the next one."""
        return self.end == self.req.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[Chunk]
    preempted: list[Request]
    starved: list[Request]  # running requests that can never get blocks (see _break_deadlock)


class Scheduler:
    """Owns the waiting queue and the running list; allocates KV blocks for each step's chunks."""

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # ------------------------------------------------------------------ queue management
    def add(self, req: Request) -> None:
        """Queue a new request (imported requests already own blocks and go straight to running)."""
        if req.status is Status.RUNNING:
            self.running.append(req)
        else:
            self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Take a request out of the queues (finish, abort, or hand-off); its blocks are kept."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks (see the module docstring for the order)."""
        out = SchedulerOutput(chunks=[], preempted=[], starved=[])
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        budget = self._schedule_running(out, budget, scheduled, decoding=True)
        budget = self._schedule_running(out, budget, scheduled, decoding=False)
        if not out.preempted:  # re-admitting right away would only thrash
            self._admit_waiting(out, budget)
        if not out.chunks and self.running:
            self._break_deadlock(out)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, scheduled: set[int],
                          decoding: bool) -> int:
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not Status.RUNNING or req.is_decoding != decoding:
                continue  # preempted earlier in this loop, or not this pass's kind
            end = req.num_computed + min(req.num_pending, budget)
            if not self._grow_or_preempt(req, end, scheduled, out):
                continue
            out.chunks.append(Chunk(req, req.num_computed, end))
            scheduled.add(id(req))
            budget -= end - req.num_computed
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            room = self.blocks.num_free * self.blocks.block_size
            n = min(req.num_pending, budget, room)
            if n <= 0:
                return  # no blocks: wait for running requests to free some
            self.blocks.grow(req.block_ids, n)
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            out.chunks.append(Chunk(req, 0, n))
            budget -= n

    # ------------------------------------------------------------------ memory pressure
    def _grow_or_preempt(self, req: Request, num_tokens: int, scheduled: set[int],
                         out: SchedulerOutput) -> bool:
        """Get blocks for ``num_tokens`` tokens of ``req``, preempting newer requests if needed."""
        while not self.blocks.grow(req.block_ids, num_tokens):
            victim = self._victim(exclude=req, scheduled=scheduled)
            if victim is None:
                return False  # req waits this step; the requests ahead of it will free blocks
            self._preempt(victim, out)
        return True

    def _victim(self, exclude: Request, scheduled: set[int]) -> Request | None:
        for req in reversed(self.running):
            if req is not exclude and id(req) not in scheduled and req.recomputable:
                return req
        return None

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.blocks.free(req.block_ids)
        self.running.remove(req)
        req.reset_for_recompute()
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def _break_deadlock(self, out: SchedulerOutput) -> None:
        """Nothing could run: every running request needs a block nobody can give (the rest is
        pinned or held by requests that cannot be recomputed). The newest request steps back:
        recomputed later if it can be, else given up (an imported request's prompt is unknown)."""
        victim = self.running[-1]
        if victim.recomputable:
            self._preempt(victim, out)
            return
        self.running.remove(victim)
        out.starved.append(victim)
