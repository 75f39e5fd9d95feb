"""Continuous-batching scheduler: decode first, chunked prefill, budgets, preemption, waiting.

No model is needed: ``_run`` plays the model by marking each chunk's KV computed and appending a
token when a chunk reaches the end of its sequence.
"""

from common.protocol import SamplingParams
from workers.engine.block_manager import BlockManager
from workers.engine.request import Request, Status
from workers.engine.scheduler import Scheduler


def _req(rid: str, prompt_len: int, max_tokens: int = 100) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), max_tokens)


def _run(out) -> None:
    for c in out.chunks:
        c.req.num_computed = c.end
        if c.samples:
            c.req.token_ids.append(7)


def _spans(out) -> list[tuple[str, int, int]]:
    return [(c.req.request_id, c.start, c.end) for c in out.chunks]


def test_chunked_prefill_then_decode():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16)
    s.add(_req("a", 40))
    spans = []
    for _ in range(4):
        out = s.schedule()
        spans.append(_spans(out))
        _run(out)
    assert spans == [[("a", 0, 16)], [("a", 16, 32)], [("a", 32, 40)], [("a", 40, 41)]]


def test_decodes_go_first_and_prefill_fills_the_budget():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    s.add(_req("a", 3))
    s.add(_req("b", 3))
    _run(s.schedule())  # both prefilled in one step (6 <= 10)
    s.add(_req("c", 30))
    out = s.schedule()
    assert _spans(out) == [("a", 3, 4), ("b", 3, 4), ("c", 0, 8)]
    _run(out)
    out = s.schedule()  # decodes of a, b, then c's prefill continues with what is left
    assert _spans(out) == [("a", 4, 5), ("b", 4, 5), ("c", 8, 16)]


def test_max_num_seqs_limits_running():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for rid in "abc":
        s.add(_req(rid, 4))
    out = s.schedule()
    assert [c.req.request_id for c in out.chunks] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_waiting_request_waits_for_blocks():
    bm = BlockManager(4, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    s.add(_req("a", 16, max_tokens=1))
    s.add(_req("b", 4))
    out = s.schedule()
    assert _spans(out) == [("a", 0, 16)]  # b does not fit: it waits, nothing is preempted
    _run(out)
    a = s.running[0]
    s.remove(a)
    bm.free(a.block_ids)
    assert _spans(s.schedule()) == [("b", 0, 4)]


def test_out_of_blocks_preempts_newest_and_recomputes():
    bm = BlockManager(4, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = _req("a", 8), _req("b", 8)
    s.add(a)
    s.add(b)
    _run(s.schedule())  # all 4 blocks used; both now need a 3rd block to decode
    out = s.schedule()
    assert out.preempted == [b] and _spans(out) == [("a", 8, 9)]
    assert b.status is Status.WAITING and b.num_computed == 0 and b.block_ids == []
    assert b.token_ids[-1] == 7 and b.num_tokens == 9  # its output token is kept for recompute
    _run(out)
    a.status = Status.FINISHED
    s.remove(a)
    bm.free(a.block_ids)
    assert _spans(s.schedule()) == [("b", 0, 9)]  # prompt + output prefilled again


def test_requests_that_cannot_be_recomputed_are_given_up_not_spun():
    bm = BlockManager(2, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    imported = _req("x", 8)
    imported.token_ids.append(7)
    imported.num_computed = 8
    imported.block_ids = bm.allocate(2)
    imported.recomputable = False
    imported.status = Status.RUNNING
    s.add(imported)
    out = s.schedule()  # needs a 3rd block, none exist, nobody to preempt
    assert out.chunks == [] and out.starved == [imported] and not s.running
