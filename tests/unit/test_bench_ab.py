"""bench.ab's reading of pairs: medians of each side, and the median and range of the pairs' own ratios."""

from __future__ import annotations

import pytest

from bench.ab import Pair, _env, summary


def test_a_change_is_the_median_of_the_pairs_ratios_not_the_ratio_of_medians() -> None:
    pairs = [
        Pair(32, (1000.0, 1100.0), (10.0, 9.0), (800.0, 700.0), 0),  # a quiet moment: B +10 %
        Pair(32, (500.0, 560.0), (20.0, 18.0), (900.0, 800.0), 1),  # a busy moment: B +12 %
        Pair(32, (2000.0, 2100.0), (5.0, 5.0), (700.0, 650.0), 0),  # B +5 %
    ]
    line = summary(pairs)
    assert "A 1,000 req/s p50 10.00 ms cpu 800 us batch nan" in line  # the workers' metrics unread
    assert "B 1,100 req/s p50 9.00 ms cpu 700 us batch nan" in line
    assert "B/A req/s 1.100 [1.05-1.12]" in line  # the medians' ratio would say the same here, by luck
    assert "p50 0.900 [0.90-1.00]" in line
    assert "(3 pairs, 1 errors)" in line
    assert "B/A req/s 1.050" in summary([pairs[0], pairs[2], Pair(32, (100.0, 100.0), (1.0, 1.0), (1.0, 1.0), 0)])


def test_settings_are_name_value_pairs() -> None:
    assert _env(["MAAS_GATEWAY_DIRECT_REPLIES=false", "X=a=b"]) == {"MAAS_GATEWAY_DIRECT_REPLIES": "false", "X": "a=b"}
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        _env(["MAAS_GATEWAY_DIRECT_REPLIES"])


def test_the_mean_batch_is_the_median_of_the_pairs_that_read_it() -> None:
    pairs = [
        Pair(32, (1000.0, 1000.0), (10.0, 10.0), (800.0, 800.0), 0, (3.5, 4.0)),
        Pair(32, (1000.0, 1000.0), (10.0, 10.0), (800.0, 800.0), 0, (3.9, float("nan"))),  # B's scrape failed
        Pair(32, (1000.0, 1000.0), (10.0, 10.0), (800.0, 800.0), 0, (3.7, 5.0)),
    ]
    line = summary(pairs)
    assert "cpu 800 us batch 3.7 | B" in line
    assert "cpu 800 us batch 4.5 | B/A" in line
