"""The benchmark's rounds: medians, sums, and ratios taken within each round."""

from __future__ import annotations

import pytest

from bench.rawort import RawOrt
from bench.report import Row, add_ratios, merge_rounds


def _row(system: str, clients: int, rps: float, **fields: object) -> Row:
    values: dict[str, object] = {
        "model": "tiny", "system": system, "clients": clients, "requests": int(rps), "errors": 0, "rps": rps,
        "p50_ms": 1000 / rps, "p99_ms": 2000 / rps, "mean_batch": 1.0, "cpu_us": {"server": 1e6 / rps},
    }  # fmt: skip
    return Row(**(values | fields))  # type: ignore[arg-type]


def _raw(best_ips: float) -> RawOrt:
    return RawOrt(batch1_ips=best_ips / 10, batch1_p50_ms=0.1, best_ips=best_ips, best_batch=64,
                  by_batch={1: best_ips / 10, 64: best_ips})  # fmt: skip


def _rounds(floor_rps: list[float], maas_rps: list[float], raw_ips: list[float]) -> list[list[Row]]:
    rounds = []
    for floor, maas, raw in zip(floor_rps, maas_rps, raw_ips, strict=True):
        rows = [_row("maas", 32, maas), _row("floor", 32, floor)]
        add_ratios(rows, {"tiny": _raw(raw)})
        rounds.append(rows)
    return rounds


def test_a_ratio_is_the_median_of_the_rounds_own_ratios_not_a_ratio_of_medians() -> None:
    # The machine slows down in round 2: both sides of that round's ratio move together.
    rounds = _rounds(floor_rps=[4000, 2000, 3800], maas_rps=[2000, 1100, 1800], raw_ips=[100, 50, 90])
    [floor, maas] = merge_rounds(rounds, ["floor", "maas"])
    assert maas.rps == 1800  # median of 2000, 1100, 1800
    assert floor.rps == 3800
    assert maas.x_floor == pytest.approx(0.5)  # median of 0.5, 0.55, 0.474: not 1800 / 3800
    assert maas.x_raw_best == pytest.approx(20)  # median of 20, 22, 20
    assert maas.rps_by_round == [2000, 1100, 1800]
    assert maas.rps_spread == pytest.approx((2000 - 1100) / 1800)


def test_merged_rows_sum_counts_take_medians_and_keep_the_systems_order() -> None:
    rounds = [
        [_row("maas", 8, 100, errors=1, first_error=""), _row("floor", 8, 300), _row("maas", 1, 50)],
        [_row("maas", 8, 120, errors=2, first_error="boom"), _row("floor", 8, 310), _row("maas", 1, 60)],
    ]
    merged = merge_rounds(rounds, ["floor", "maas"])
    assert [(r.system, r.clients) for r in merged] == [("floor", 8), ("maas", 1), ("maas", 8)]
    maas8 = merged[2]
    assert (maas8.requests, maas8.errors, maas8.first_error) == (220, 3, "boom")
    assert maas8.rps == 110
    assert maas8.cpu_us == {"server": pytest.approx((1e6 / 100 + 1e6 / 120) / 2)}
    assert merge_rounds([rounds[0]], ["floor", "maas"])[2].rps_spread is None  # one round: no spread


def test_raw_ort_medians_pick_the_best_batch_of_the_medians() -> None:
    rounds = [
        RawOrt(1000, 1.0, 5000, 64, {32: 4000, 64: 5000}),
        RawOrt(900, 1.2, 4800, 32, {32: 4800, 64: 4500}),
        RawOrt(1100, 0.9, 4700, 32, {32: 4700, 64: 4600}),
    ]
    raw = RawOrt.median(rounds)
    assert (raw.batch1_ips, raw.batch1_p50_ms) == (1000, 1.0)
    assert raw.by_batch == {32: 4700, 64: 4600}
    assert (raw.best_batch, raw.best_ips) == (32, 4700)
