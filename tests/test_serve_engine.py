"""The serving engine: batched decoding equals decoding alone, cancelled requests free their slots, a full queue
says so, and the slot pool keeps rows of different lengths apart."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from finetune_helpers import single_thread
from parity import assert_parity
from ownllm.errors import OwnLLMError
from ownllm.decoding import SamplingOptions, generate_ids
from ownllm.serve.engine import Engine, EngineBusy

PROMPTS = ["The list", "def f(x):\n    return", "In Python, a", "import", "class A:\n", "Return the value of x",
           "A string", "x"]


@pytest.fixture(scope="module")
def run(base):
    import ownllm

    with single_thread():
        yield ownllm.load(base)


class Collector:
    """Events of several requests, by request index."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()

    def receiver(self, index: int):
        return lambda event: self.events.put((index, event))

    def wait(self, count: int, timeout: float = 120) -> dict[int, tuple[str, str, int]]:
        """{index: (text, finish_reason, completion_tokens)} once `count` requests are done."""
        texts: dict[int, str] = {}
        done: dict[int, tuple[str, str, int]] = {}
        deadline = time.monotonic() + timeout
        while len(done) < count:
            index, event = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            if event[0] == "text":
                texts[index] = texts.get(index, "") + event[1]
            elif event[0] == "done":
                done[index] = (texts.get(index, ""), event[1], event[2].completion_tokens)
            else:
                raise AssertionError(event)
        return done


def alone(run, prompt: str, max_tokens: int) -> list[int]:
    return generate_ids(run.model, [run.tokenizer.encode(prompt)], SamplingOptions(max_new_tokens=max_tokens,
                                                                                   temperature=0),
                        eot_id=run.tokenizer.eot_id)[0]


def test_batched_greedy_tokens_equal_decoding_each_alone(run):
    # Different prompt lengths and budgets, so rows finish at different steps and later ones move into their slots;
    # half the requests arrive while the others are already decoding.
    budgets = [40, 7, 25, 3, 33, 12, 18, 29]
    engine = Engine(run.model, run.tokenizer, max_batch=5, max_queue=8).start()
    outputs = {}
    try:
        collector = Collector()
        requests = []
        for index, (prompt, budget) in enumerate(zip(PROMPTS, budgets)):
            requests.append(engine.submit(run.tokenizer.encode(prompt),
                                          SamplingOptions(max_new_tokens=budget, temperature=0),
                                          collector.receiver(index)))
            if index == 3:
                time.sleep(0.05)
        done = collector.wait(len(PROMPTS))
        outputs = {i: r.output for i, r in enumerate(requests)}
        assert engine.steps < sum(budgets)  # requests really shared decoding steps
    finally:
        engine.close()
    for index, (prompt, budget) in enumerate(zip(PROMPTS, budgets)):
        expected = alone(run, prompt, budget)
        assert outputs[index] == expected, prompt
        assert done[index][0] == run.tokenizer.decode(expected)
        assert done[index][2] == len(expected)
        assert done[index][1] == ("length" if len(expected) == budget else "stop")


def test_seeded_sampling_does_not_depend_on_the_batch(run):
    options = SamplingOptions(max_new_tokens=20, temperature=1.0, top_k=50, seed=3)
    engine = Engine(run.model, run.tokenizer, max_batch=4).start()
    try:
        collector = Collector()
        engine.submit(run.tokenizer.encode("The list"), options, collector.receiver(0))
        solo = collector.wait(1)[0]
        collector = Collector()
        for index, prompt in enumerate(["The list", "import", "x", "def "]):
            engine.submit(run.tokenizer.encode(prompt), options, collector.receiver(index))
        crowd = collector.wait(4)[0]
    finally:
        engine.close()
    assert solo == crowd


def test_cancelled_request_frees_its_slot(run):
    engine = Engine(run.model, run.tokenizer, max_batch=2).start()
    try:
        events: list = []
        holder: dict = {}

        def receive(event):  # the client goes away as soon as its first text arrives
            events.append(event)
            engine.cancel(holder["request"])

        holder["request"] = request = engine.submit(
            run.tokenizer.encode("x"), SamplingOptions(max_new_tokens=100, temperature=1.0, seed=1,
                                                       stop_at_eot=False), receive)
        deadline = time.monotonic() + 30
        while not (events and engine.stats()["running"] == 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events and engine.stats()["running"] == 0
        assert request.generated <= 2  # the slot was freed at the next step, not after 100 tokens
        assert all(event[0] == "text" for event in events)
        collector = Collector()  # the engine serves on
        engine.submit(run.tokenizer.encode("The list"), SamplingOptions(max_new_tokens=5, temperature=0),
                      collector.receiver(0))
        assert collector.wait(1)[0][2] == len(alone(run, "The list", 5))
    finally:
        engine.close()


def test_full_queue_is_refused_and_limits_are_checked(run):
    engine = Engine(run.model, run.tokenizer, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    ids = run.tokenizer.encode("x")
    options = SamplingOptions(max_new_tokens=5)
    engine.submit(ids, options, lambda event: None)  # takes the free slot
    engine.submit(ids, options, lambda event: None)  # waits in the queue
    with pytest.raises(EngineBusy, match="busy"):
        engine.submit(ids, options, lambda event: None)
    with pytest.raises(OwnLLMError, match="context window"):
        engine.submit(list(range(run.config.block_size)), options, lambda event: None)
    with pytest.raises(OwnLLMError, match="no tokens"):
        engine.submit([], options, lambda event: None)


def test_slot_pool_rows_of_different_lengths_match_separate_caches(run):
    """One decode step over rows of lengths 3 and 9 gives each row the logits it gets with a cache of its own."""
    from ownllm.kvcache import SlotPool

    model = run.model
    rows = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16]]
    pool = SlotPool(model.config, slots=2, max_len=32, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for slot, ids in enumerate(rows):
            model(torch.tensor([ids]), cache=pool.prefill_view(slot))
            pool.lengths[slot] = len(ids)
        view = pool.decode_view(2)
        batched = model(torch.tensor([[20], [21]]), cache=view, positions=view.positions.view(-1, 1))[:, -1]
        for row, (ids, token) in enumerate(zip(rows, [20, 21])):
            separate = model(torch.tensor([ids + [token]]))[:, -1]
            assert_parity(batched[row:row + 1], separate, layers=model.config.n_layer, what="batched step vs alone")
    assert pool.lengths == [4, 10]


def test_on_demand_pool_grows_keeping_what_it_holds(run, monkeypatch):
    """A pool that starts empty and grows (rows one at a time, positions 4 -> 8 -> ... while decoding) gives every
    step the logits of a pool allocated at full size."""
    import ownllm.kvcache
    from ownllm.decoding import prefill, step

    monkeypatch.setattr(ownllm.kvcache, "MIN_ON_DEMAND", 4)
    model = run.model
    pools = [ownllm.kvcache.SlotPool(model.config, slots=3, max_len=48, device="cpu", dtype=torch.float32,
                                     on_demand=grow) for grow in (False, True)]
    assert pools[1].nbytes() == 0 and pools[1].limit_bytes() == pools[0].nbytes()
    with torch.no_grad():
        logits = [prefill(model, pool, 0, [[5, 6, 7]]) for pool in pools]
        assert_parity(logits[1], logits[0], layers=model.config.n_layer, what="on-demand pool vs full, prefill")
        logits = [prefill(model, pool, 1, [[8, 9], [10, 11, 12, 13, 14]]) for pool in pools]  # rows 2, 3 arrive
        assert_parity(logits[1], logits[0], layers=model.config.n_layer, what="on-demand pool vs full, prefill")
        tokens = torch.tensor([20, 21, 22])
        for _ in range(35):  # the longest row reaches 40 positions: the storage doubles three times
            logits = [step(model, pool, tokens) for pool in pools]
            assert_parity(logits[1], logits[0], layers=model.config.n_layer, what="on-demand pool vs full, step")
            tokens = logits[0].argmax(dim=-1)
    grown = pools[1]
    assert grown.lengths == pools[0].lengths == [38, 37, 40]
    assert grown.keys.shape[1] == 3 and grown.keys.shape[3] == 48  # 64 capped at max_len
    grown.release()
    assert grown.nbytes() == 0


def test_the_engine_holds_cache_memory_only_for_running_requests(run):
    """The server's KV memory follows its use: one short request holds one slot of a few hundred positions, not
    max_batch x context, and the memory is given back when no request runs."""
    engine = Engine(run.model, run.tokenizer, max_batch=16).start()
    try:
        seen: list[int] = []
        collector = Collector()
        receive = collector.receiver(0)

        def on_event(event) -> None:
            seen.append(engine.pool_bytes())  # called on the engine's thread, between steps
            receive(event)

        engine.submit(run.tokenizer.encode(PROMPTS[0]), SamplingOptions(max_new_tokens=20, temperature=0), on_event)
        collector.wait(1)
        config = run.config
        one_slot = 2 * config.n_layer * config.kv_heads * min(256, engine.context) * config.head_size * 4
        assert seen and max(seen) == one_slot
        assert engine.pool_limit_bytes() == 16 * one_slot * engine.context // min(256, engine.context)
        deadline = time.monotonic() + 10
        while engine.pool_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.pool_bytes() == 0
    finally:
        engine.close()


def test_ctrl_c_between_admitting_and_prefilling_still_answers_every_request(run, monkeypatch):
    # Ctrl-C on the engine's thread after it took requests from the queue and before they had a slot: each request
    # must still hear that the server is shutting down, or its client (and the server's HTTP shutdown) waits for ever
    engine = Engine(run.model, run.tokenizer, max_batch=4, max_queue=4)
    collector = Collector()
    for index, prompt in enumerate(["x", "a much longer prompt than the first one " * 4, "import"]):
        engine.submit(run.tokenizer.encode(prompt), SamplingOptions(max_new_tokens=5, temperature=0),
                      collector.receiver(index))

    def interrupted(group):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_prefill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    events = [collector.events.get_nowait() for _ in range(collector.events.qsize())]
    assert sorted(index for index, _ in events) == [0, 1, 2]
    assert all(event[0] == "error" and event[2] == 503 for _, event in events)
