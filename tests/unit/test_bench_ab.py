"""bench/ab_virtio.py's statistics and table (the lab part is run by hand: bench/README.md)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import ab_virtio as ab


def test_mann_whitney_exact_p_of_complete_separation_is_two_splits_of_all() -> None:
    a = [float(x) for x in range(8)]
    b = [float(x) for x in range(10, 18)]
    assert math.isclose(ab.mann_whitney_p(a, b), 2 / math.comb(16, 8))
    assert math.isclose(ab.mann_whitney_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]), 2 / 20)


def test_mann_whitney_exact_p_counts_both_tails() -> None:
    # U of b over a is 14 of 16; splits of 8 values into 4+4 with U <= 2 or >= 14: 4 + 4 of 70
    assert math.isclose(ab.mann_whitney_p([1, 2, 3, 4], [2.5, 5, 6, 7]), 8 / 70)


def test_mann_whitney_same_samples_and_ties_give_p_one() -> None:
    assert ab.mann_whitney_p([5.0, 5.0, 5.0], [5.0, 5.0, 5.0]) == 1.0
    assert ab.mann_whitney_p([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == 1.0


def test_mann_whitney_normal_approximation_for_large_samples() -> None:
    a = [float(x) for x in range(20)]
    b = [float(x) + 100 for x in range(20)]
    assert ab.mann_whitney_p(a, b) < 1e-6
    assert ab.mann_whitney_p(a, [x + 0.5 for x in a]) > 0.5


def test_bootstrap_interval_of_constant_samples_is_the_ratio() -> None:
    assert ab.bootstrap_ratio([10.0] * 5, [12.0] * 5, rounds=200) == (1.2, 1.2)


def test_bootstrap_interval_holds_the_ratio_of_medians_and_is_repeatable() -> None:
    a = [100.0, 104.0, 97.0, 110.0, 92.0, 101.0, 99.0, 106.0]
    b = [x * 0.9 for x in a]
    low, high = ab.bootstrap_ratio(a, b, rounds=2000)
    assert low <= 0.9 <= high
    assert (low, high) == ab.bootstrap_ratio(a, b, rounds=2000)


def test_markdown_table_has_medians_ranges_and_the_test() -> None:
    per = {"aaaaaaa": [100.0, 110.0, 90.0], "bbbbbbb": [50.0, 55.0, 45.0]}
    payload = {
        "order": ["aaaaaaa", "bbbbbbb"],
        "samples": {key: per for key in ab.TAGS.values()},
        "errors": ["round 2 bbbbbbb: no blk-read"],
        "rounds_done": 3,
        "date": "2026-12-06T21:00:00Z",
    }
    text = ab.markdown(payload)
    assert "| **100** (90.0-110) | **50.0** (45.0-55.0) | 0.500 |" in text
    assert "| 0.100 |" in text  # 3 against 3, separated: 2 of 20 splits
    assert "round 2 bbbbbbb: no blk-read" in text


def test_markdown_lists_every_run_with_the_warm_up() -> None:
    per: dict[str, list[float]] = {"aaaaaaa": [1.0], "bbbbbbb": [2.0]}
    runs = [{"round": 0, "commit": "aaaaaaa", "seconds": 60.0, "blk_seq_read": 95.2},
            {"round": 1, "commit": "bbbbbbb", "seconds": 45.5, "blk_seq_read": 158.0}]
    payload = {"order": ["aaaaaaa", "bbbbbbb"], "samples": {key: per for key in ab.TAGS.values()},
               "errors": [], "rounds_done": 1, "runs": runs}
    text = ab.markdown(payload)
    assert "| 0 | aaaaaaa | 60 | 95.2 | — |" in text
    assert "| 1 | bbbbbbb | 45.5 | 158 | — |" in text


def test_signed_rank_exact_p() -> None:
    assert math.isclose(ab.signed_rank_p([1.1] * 8), 2 / 256)  # every round the same way
    # log ratios 1, -2, 3: ranks 1, 2, 3, W+ = 4 of 6; 6 of the 8 sign assignments are as far from 3
    assert math.isclose(ab.signed_rank_p([math.e, math.exp(-2), math.exp(3)]), 6 / 8)
    assert ab.signed_rank_p([1.0, 1.0]) == 1.0
    assert ab.signed_rank_p([1.2, 1 / 1.2]) == 1.0  # tied magnitudes, opposite signs


def test_pairs_follow_rounds_and_skip_the_warm_up_and_half_rounds() -> None:
    runs = [
        {"round": 0, "commit": "a", "blk_seq_read": 50.0},
        {"round": 0, "commit": "b", "blk_seq_read": 100.0},
        {"round": 1, "commit": "a", "blk_seq_read": 100.0},
        {"round": 1, "commit": "b", "blk_seq_read": 90.0},
        {"round": 2, "commit": "b", "blk_seq_read": 120.0},
        {"round": 2, "commit": "a", "blk_seq_read": 100.0},
        {"round": 3, "commit": "a", "blk_seq_read": 100.0},
    ]
    payload = {"order": ["a", "b"], "runs": runs, "errors": ["round 3 b: exit status 1"], "samples": {}}
    assert ab.pairs(payload, "blk_seq_read") == [0.9, 1.2]
    samples = {"blk_seq_read": {"a": [10.0, 20.0], "b": [5.0, 30.0]}}
    older = {"order": ["a", "b"], "errors": [], "samples": samples}
    assert ab.pairs(older, "blk_seq_read") == [0.5, 1.5]


def test_pool_joins_sessions_and_renumbers_their_rounds() -> None:
    def session(a: float, b: float) -> dict[str, object]:
        runs = [{"round": 0, "commit": "a", "blk_seq_read": 1.0},
                {"round": 1, "commit": "a", "blk_seq_read": a},
                {"round": 1, "commit": "b", "blk_seq_read": b}]
        samples = {key: {"a": [a], "b": [b]} for key in ab.TAGS.values()}
        return {"order": ["a", "b"], "runs": runs, "samples": samples, "errors": [], "rounds_done": 1}

    pooled = ab.pool([session(100.0, 90.0), session(100.0, 80.0)])
    assert pooled["rounds_done"] == 2
    assert pooled["samples"]["blk_seq_read"] == {"a": [100.0, 100.0], "b": [90.0, 80.0]}
    assert [r["round"] for r in pooled["runs"]] == [0, 1, 1, 0, 2, 2]
    assert ab.pairs(pooled, "blk_seq_read") == [0.9, 0.8]
