"""Where a batch is cut into runs: the learnt run-cost model and its optimal cut."""
import random

import numpy as np

from akidb_ros.engine import EmbedRequest
from akidb_ros.engine.batcher import RunCostModel, cut_by_cost
from engine_support import MINILM, Gate, make_engine


def test_fit_recovers_overhead_and_per_token_cost():
    model = RunCostModel(decay=1.0)
    rng = random.Random(3)
    for _ in range(200):
        x = rng.randint(8, 2000)
        model.observe(x, 0.0025 + 2e-6 * x + rng.gauss(0, 1e-5))
    overhead, per_token = model.params()
    assert abs(overhead - 0.0025) < 1e-4
    assert abs(per_token - 2e-6) < 1e-7


def test_no_fit_before_enough_varied_runs():
    model = RunCostModel(min_samples=12)
    for _ in range(11):
        model.observe(100, 0.01)
    assert model.params() is None            # too few
    model.observe(100, 0.01)
    assert model.params() is None            # enough, but all the same size: no slope
    model.observe(1000, 0.05)
    assert model.params() is not None


def test_a_noisy_negative_slope_is_not_trusted():
    model = RunCostModel(decay=1.0, min_samples=4)
    for x, y in ((10, 0.05), (100, 0.04), (1000, 0.03), (2000, 0.02)):
        model.observe(x, y)
    assert model.params() is None


def test_a_flat_cost_keeps_runs_whole():
    """On a GPU a run costs its kernel launches whatever its size: the slope is zero within the
    noise, sometimes just below it, and that must mean one run (not a fall back to cutting)."""
    for seed in range(20):
        model = RunCostModel(decay=0.98)
        rng = random.Random(seed)
        for _ in range(60):
            model.observe(rng.randint(8, 2000), 0.002 + rng.gauss(0, 2e-4))
        overhead, per_token = model.params()
        assert abs(overhead - 0.002) < 3e-4 and per_token < 2e-7
        assert cut_by_cost([5, 6, 7, 30, 31, 90], overhead, per_token) == [6]


def test_the_cut_keeps_every_run_within_the_token_budget():
    lengths = [10, 10, 10, 10]
    assert cut_by_cost(lengths, overhead=1.0, per_token=1e-6) == [4]
    assert cut_by_cost(lengths, overhead=1.0, per_token=1e-6, max_tokens=25) == [2, 4]
    assert cut_by_cost([300], overhead=1.0, per_token=1e-6, max_tokens=25) == [1]   # one row


def _cost(lengths, ends, overhead, per_token):
    starts = [0] + ends[:-1]
    return sum(overhead + per_token * (j - i) * lengths[j - 1] for i, j in zip(starts, ends))


def test_costly_runs_keep_the_batch_whole_cheap_runs_cut_the_padding():
    lengths = [5, 6, 7, 30, 31, 90]
    assert cut_by_cost(lengths, overhead=1.0, per_token=1e-6) == [6]        # GPU-like
    assert cut_by_cost(lengths, overhead=1e-9, per_token=1.0) == [1, 2, 3, 4, 5, 6]
    cpu_like = cut_by_cost(lengths, overhead=3.0, per_token=1.0)
    assert cpu_like == [3, 5, 6]          # the three length groups


def test_the_cut_is_optimal_against_every_partition():
    rng = random.Random(7)
    for _ in range(40):
        lengths = sorted(rng.randint(1, 80) for _ in range(rng.randint(1, 9)))
        a, b = rng.uniform(0, 50), rng.uniform(0.1, 2)
        got = _cost(lengths, cut_by_cost(lengths, a, b), a, b)
        n = len(lengths)
        best = min(_cost(lengths, [j for j in range(1, n) if mask >> (j - 1) & 1] + [n], a, b)
                   for mask in range(1 << (n - 1)))
        assert got <= best + 1e-9


def test_the_engine_learns_its_run_cost_and_answers_the_same(tmp_path):
    eng = make_engine(tmp_path)
    try:
        texts = ['stop', 'the arm is moving to the left shelf now', 'battery low',
                 'navigation goal reached at the charging station near the loading dock ' * 4]
        before = eng.embed(EmbedRequest(inputs=texts)).embeddings
        for i in range(16):   # varied run sizes so the fit has a slope to find
            eng.embed(EmbedRequest(inputs=texts[: 1 + i % 4] * (1 + i % 3)))
        batcher = eng.manager.loaded(eng.default_model).batcher
        assert batcher.cost.samples >= 16
        assert batcher.cost.params() is not None
        np.testing.assert_allclose(eng.embed(EmbedRequest(inputs=texts)).embeddings, before,
                                   atol=1e-5)
    finally:
        eng.close()


def test_each_run_is_planned_from_the_whole_queue_around_its_oldest_sentence(tmp_path):
    """With a learnt CPU-like cost the runner plans one run at a time from everything queued:
    the run holding the oldest sentence goes first and takes the queued sentences of its
    length; the others wait for the next plan. Vectors equal the single calls."""
    eng = make_engine(tmp_path, lambda r: r['engine']['batching'].update(
        runners=1, max_wait_ms=0, split_policy='cost'))
    try:
        longs = [f'the robot arm moves the blue crate to shelf number {n} now' for n in 'abc']
        shorts = ['ok', 'stop', 'go']
        singles = {t: eng.embed(EmbedRequest(inputs=[t])).embeddings[0] for t in longs + shorts}
        batcher = eng.manager.loaded(MINILM).batcher
        for k in range(60):                    # ~3 ms a run + 0.27 ms a padded token
            x = 16 + 40 * (k % 12)
            batcher.cost.observe(x, 0.003 + 2.7e-4 * x)
        gate = Gate(batcher)
        gate.close()
        blocker = eng.submit(EmbedRequest(inputs=['hold']))
        assert gate.entered.wait(5)
        order = [longs[0], shorts[0], longs[1], shorts[1], shorts[2], longs[2]]
        futures = [eng.submit(EmbedRequest(inputs=[t])) for t in order]
        gate.open.set()
        blocker.result(10)
        for text, fut in zip(order, futures):
            np.testing.assert_allclose(fut.result(10).embeddings[0], singles[text], atol=1e-5)
        long_width = max(gate.shapes[1][1], gate.shapes[2][1])
        assert [b for b, _ in gate.shapes[1:]] == [3, 3]
        assert gate.shapes[1][1] == long_width > gate.shapes[2][1]   # the oldest's run first
    finally:
        eng.close()
