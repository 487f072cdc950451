"""Benchmark of armguard's drift and anomaly detectors against river's, on seeded streams.

Prints markdown tables (paste into bench/README.md, section "Drift and anomaly"):

1. change detection on per-interval metric streams: false alarms per 10,000 updates on no-change
   streams (i.i.d. normal, AR(1) with phi 0.5 and 0.8, heavy-tailed t(2)), and for each change
   scenario the share of runs detected and the median / 90th percentile delay, for RankCUSUM
   (expected_run_length=10,000) beside river's ADWIN, PageHinkley and KSWIN with their defaults;
2. the per-update cost of each detector;
3. anomaly detection on a seasonal series (SeasonalZScore);
4. histogram drift and calibration drift: false alarms per 10,000 evaluations and cost (WindowDrift
   also on Summaries, the daemon's input, with and without a snapshot after each update);
5. batched histogram drift (``--only batched``): ``TwoSampleDrift.update_many``,
   ``WindowDrift.update_many`` and ``CalibrationDrift.update_many`` per-update cost by batch
   size (the last alone: ``--only calibration-batched``), and the evaluate engine's drift
   cost when thousands of experiments tick at once (``Engine.apply_summaries``).

Run: ``.venv/bin/python bench/drift.py`` (about a minute on one core; ``--quick`` for a smoke
run). Everything is seeded; the figures are reproducible.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from river import drift

from armguard.detectors import (
    CalibrationDrift,
    RankCUSUM,
    SeasonalZScore,
    Summary,
    TwoSampleDrift,
    WindowDrift,
)
from armguard.detectors.calibration_drift import bin_predictions

ARL = 10_000.0


# -- streams ---------------------------------------------------------------------------------


def ar1(rng: np.random.Generator, phi: float, shape: tuple[int, int]) -> np.ndarray:
    e = rng.standard_normal(shape) * math.sqrt(1 - phi * phi)
    out = np.empty(shape)
    out[:, 0] = rng.standard_normal(shape[0])
    for t in range(1, shape[1]):
        out[:, t] = phi * out[:, t - 1] + e[:, t]
    return out


def no_change(name: str, rng: np.random.Generator, runs: int, n: int) -> np.ndarray:
    if name == "iid normal":
        return rng.standard_normal((runs, n))
    if name == "AR(1) phi=0.5":
        return ar1(rng, 0.5, (runs, n))
    if name == "AR(1) phi=0.8":
        return ar1(rng, 0.8, (runs, n))
    if name == "heavy-tailed t(2)":
        return rng.standard_t(2, (runs, n))
    raise KeyError(name)


def with_change(name: str, rng: np.random.Generator, runs: int, n_pre: int, n_post: int):
    pre = rng.standard_normal((runs, n_pre))
    z = rng.standard_normal((runs, n_post))
    if name == "mean +0.5 sd":
        post = z + 0.5
    elif name == "mean +1 sd":
        post = z + 1.0
    elif name == "variance x2":
        post = z * math.sqrt(2.0)
    elif name == "normal to bimodal (same mean, var)":
        a = 0.9
        post = np.where(rng.random(z.shape) < 0.5, -a, a) + math.sqrt(1 - a * a) * z
    elif name == "gradual drift 0 to 2 sd over 1000":
        post = z + np.linspace(0.0, 2.0, n_post)
    else:
        raise KeyError(name)
    return np.concatenate([pre, post], axis=1)


NO_CHANGE = ["iid normal", "AR(1) phi=0.5", "AR(1) phi=0.8", "heavy-tailed t(2)"]
CHANGES = [
    "mean +0.5 sd",
    "mean +1 sd",
    "variance x2",
    "normal to bimodal (same mean, var)",
    "gradual drift 0 to 2 sd over 1000",
]


# -- detectors -------------------------------------------------------------------------------


def make_detectors():
    return {
        "RankCUSUM (ARL 10k)": (
            lambda: RankCUSUM(expected_run_length=ARL),
            lambda d: d.alarm,
        ),
        "river ADWIN": (lambda: drift.ADWIN(), lambda d: d.drift_detected),
        "river PageHinkley": (lambda: drift.PageHinkley(), lambda d: d.drift_detected),
        "river KSWIN": (lambda: drift.KSWIN(seed=42), lambda d: d.drift_detected),
    }


# KSWIN runs a scipy KS test per update (~300 us): it gets a quarter of the streams.
SHARE = {"river KSWIN": 4}


def alarms_of(make, fired, stream: np.ndarray) -> list[int]:
    det = make()
    out = []
    for i, x in enumerate(stream.tolist()):
        det.update(x)
        if fired(det):
            out.append(i)
    return out


def cost_us(make, n: int = 20_000) -> float:
    xs = np.random.default_rng(0).standard_normal(n).tolist()
    det = make()
    start = time.perf_counter()
    for x in xs:
        det.update(x)
    return (time.perf_counter() - start) / n * 1e6


def fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0f}"


def bench_streams(runs_fa: int, n_fa: int, runs_change: int, n_pre: int, n_post: int) -> None:
    dets = make_detectors()
    names = list(dets)
    print("### Change detection on metric streams\n")
    print(
        f"No-change streams: false alarms per 10,000 updates ({runs_fa} streams x {n_fa}). "
        f"Change streams: {runs_change} runs, change after {n_pre} in-control values, "
        f"{n_post} after (river KSWIN, ~300 us per update, runs on a quarter of the streams); "
        "detected = share of runs with an alarm after the change; delay in "
        "updates after the change (median / p90 over detected runs); FA/10k pre = false alarms "
        "per 10,000 updates before the change.\n"
    )
    print("| scenario | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for k, scenario in enumerate(NO_CHANGE):
        data = no_change(scenario, np.random.default_rng(100 + k), runs_fa, n_fa)
        cells = []
        for name in names:
            make, fired = dets[name]
            part = data[: max(1, runs_fa // SHARE.get(name, 1))]
            n_alarms = sum(len(alarms_of(make, fired, s)) for s in part)
            cells.append(f"{n_alarms / part.size * 1e4:.1f}")
        print(f"| no change, {scenario}: FA/10k | " + " | ".join(cells) + " |")
    for k, scenario in enumerate(CHANGES):
        data = with_change(scenario, np.random.default_rng(200 + k), runs_change, n_pre, n_post)
        cells = []
        for name in names:
            make, fired = dets[name]
            delays, pre_alarms = [], 0
            n_runs = max(1, runs_change // SHARE.get(name, 1))
            for s in data[:n_runs]:
                hits = alarms_of(make, fired, s)
                pre_alarms += sum(1 for h in hits if h < n_pre)
                post = [h for h in hits if h >= n_pre]
                if post:
                    delays.append(post[0] - n_pre + 1)
            det_share = len(delays) / n_runs
            med = float(np.median(delays)) if delays else float("nan")
            p90 = float(np.quantile(delays, 0.9)) if delays else float("nan")
            fa = pre_alarms / (n_runs * n_pre) * 1e4
            cells.append(f"{det_share:.0%}, {fmt(med)} / {fmt(p90)} (FA/10k pre {fa:.0f})")
        print(f"| {scenario}: detected, delay med / p90 | " + " | ".join(cells) + " |")
    costs = [f"{cost_us(dets[name][0]):.1f}" for name in names]
    print("| cost per update (us) | " + " | ".join(costs) + " |")
    print()


# -- anomaly ---------------------------------------------------------------------------------


def seasonal(rng, days, phi, df=None):
    t = np.arange(days * 288) * 300.0
    e = rng.standard_normal(t.size) if df is None else rng.standard_t(df, t.size)
    r = np.empty(t.size)
    r[0] = e[0]
    for i in range(1, t.size):
        r[i] = phi * r[i - 1] + math.sqrt(1 - phi * phi) * e[i]
    season = 20 * np.sin(2 * np.pi * t / 86400) + 8 * np.sin(4 * np.pi * t / 86400 + 1)
    return t, 100 + season + 2.0 * r


def bench_anomaly(runs: int) -> None:
    print("### Anomaly detection on a seasonal per-interval series (SeasonalZScore)\n")
    print(
        "5-minute intervals, daily two-harmonic season (amplitude 20 and 8), noise sd 2; "
        f"{runs} runs of 10 days; alarms allowed after 2 days. Spikes: 8 per run of +-8 sd on "
        "days 3-6. Level shift: +3 sd or +4 sd from day 8. ARL 10,000.\n"
    )
    print(
        "| noise | FA/10k (clean days) | spikes found | level shift found (<6 h) | median delay |"
    )
    print("|---|---|---|---|---|")
    cases = [(phi, shift_sd, None) for phi in (0.0, 0.5) for shift_sd in (3.0, 4.0)]
    cases += [(0.0, 4.0, 3), (0.5, 4.0, 3)]
    for phi, shift_sd, df in cases:
        rng = np.random.default_rng(300 + int(10 * phi) + int(shift_sd) + (df or 0))
        fa = clean = found = total = shifts = 0
        delays = []
        for _ in range(runs):
            t, x = seasonal(rng, 10, phi, df)
            spikes = rng.choice(np.arange(3 * 288, 6 * 288), size=8, replace=False)
            x[spikes] += rng.choice([-1.0, 1.0], size=8) * 16.0
            x[7 * 288 :] += shift_sd * 2.0
            det = SeasonalZScore(expected_run_length=ARL)
            flagged, shift_at = set(), None
            for i, (xi, ti) in enumerate(zip(x.tolist(), t.tolist(), strict=True)):
                det.update(xi, ti)
                if det.alarm:
                    flagged.add(i)
                if shift_at is None and i >= 7 * 288 and det.n_level_shifts:
                    shift_at = i
                if i == 7 * 288 - 1:
                    shifts_before = det.n_level_shifts
            spike_set = set(spikes.tolist())
            found += len(spike_set & flagged)
            total += len(spike_set)
            fa += len([i for i in flagged if i < 7 * 288 and i not in spike_set])
            clean += 5 * 288
            if shift_at is not None and det.n_level_shifts > shifts_before:
                d = shift_at - 7 * 288 + 1
                if d <= 72:
                    shifts += 1
                    delays.append(d)
        med = f"{np.median(delays):.0f}" if delays else "-"
        noise = "normal" if df is None else f"t({df})"
        print(
            f"| {noise}, AR(1) phi={phi}, shift {shift_sd:.0f} sd | {fa / clean * 1e4:.1f} | "
            f"{found / total:.0%} | {shifts / runs:.0%} | {med} |"
        )
    xs = seasonal(np.random.default_rng(0), 10, 0.5)
    det = SeasonalZScore()
    start = time.perf_counter()
    for xi, ti in zip(xs[1].tolist(), xs[0].tolist(), strict=True):
        det.update(xi, ti)
    us = (time.perf_counter() - start) / xs[0].size * 1e6
    print(f"\nCost: {us:.1f} us per update.\n")


# -- histogram and calibration drift ---------------------------------------------------------


def grid_bins(counts, edges):
    keep = counts > 0
    upper = edges[1:][keep]
    return edges[:-1][keep], upper, counts[keep]


CHUNK = 1_000
# Costs in this section are process CPU time: on the shared box wall time moves by 30% or more
# with the neighbours' load, CPU time by a few percent.
cpu_clock = time.process_time


def bench_summary_inputs(evaluations: int) -> None:
    """Cost on what the daemon passes: Summaries, with and without the per-evaluation snapshot."""
    rng = np.random.default_rng(401)
    pool = [Summary.from_values(rng.lognormal(0.0, 1.0, 1_000)) for _ in range(200)]
    buckets = np.mean([s.histogram.bins()[0].size for s in pool])
    pairs = [(pool[i % 200], pool[(7 * i + 1) % 200]) for i in range(evaluations)]
    costs = {}
    for label, snapshot in (("update", False), ("update + to_state", True)):
        det = TwoSampleDrift(expected_run_length=ARL, distance="psi")
        start = cpu_clock()
        for x, y in pairs:
            det.update(x, y)
            if snapshot:
                det.to_state()
        costs[label] = (cpu_clock() - start) / evaluations * 1e6
    start = cpu_clock()
    for x, y in pairs:
        x.histogram.bins()
        y.histogram.bins()
    bins_us = (cpu_clock() - start) / evaluations * 1e6
    print(
        f"\nOn Summaries (the daemon's input; 1,000 lognormal values each, relative accuracy "
        f"0.01, {buckets:.0f} buckets): TwoSampleDrift psi {costs['update']:.0f} us per update "
        "(the two arms aligned by bucket key; LogHistogram.bins() of both, which it no longer "
        f"computes, alone costs {bins_us:.0f} us); "
        f"{costs['update + to_state']:.0f} us with to_state() after each update (the daemon "
        "snapshots every evaluation; the state holds the distances already computed)."
    )


def bench_window_summaries(evaluations: int) -> None:
    """WindowDrift on what the daemon passes (Summaries, aligned by bucket key), with and
    without the snapshot after every update."""
    rng = np.random.default_rng(402)
    pool = [Summary.from_values(rng.lognormal(0.0, 1.0, 300)) for _ in range(200)]
    costs = {}
    for label, snapshot in (("update", False), ("update + to_state", True)):
        det = WindowDrift(expected_run_length=ARL, reference_intervals=24, window_intervals=6)
        for s in pool[:30]:
            det.update(s)
        start = cpu_clock()
        for i in range(evaluations):
            det.update(pool[i % 200])
            if snapshot:
                det.to_state()
        costs[label] = (cpu_clock() - start) / evaluations * 1e6
    print(
        f"WindowDrift on Summaries (300 lognormal values each, relative accuracy 0.01, "
        f"reference 24, window 6): {costs['update']:.0f} us per update, "
        f"{costs['update + to_state']:.0f} us with to_state() after each update."
    )


def bench_histograms(evaluations: int) -> None:
    print("### Histogram drift and model-quality drift\n")
    rng = np.random.default_rng(400)
    edges = np.linspace(-4, 4, 201)
    from scipy import stats  # bench-only dependency

    probs = np.diff(stats.norm.cdf(edges))
    probs /= probs.sum()
    moved = np.diff(stats.norm.cdf(edges, loc=0.25))
    moved /= moved.sum()
    print(
        f"TwoSampleDrift: {evaluations} evaluations of treatment vs control, 1,000 values each "
        "on 200 buckets, no difference (FA/10k) and a 0.25 sd shift (share detected). "
        "ARL 10,000. Costs: CPU time per update, inputs built outside the timed loop.\n"
    )
    print("| distance | FA/10k evaluations | 0.25 sd shift detected | cost per evaluation (us) |")
    print("|---|---|---|---|")
    a = rng.multinomial(1000, probs, size=evaluations)
    b = rng.multinomial(1000, probs, size=evaluations)
    c = rng.multinomial(1000, moved, size=200)
    for distance in ("psi", "js", "ks", "wasserstein"):
        det = TwoSampleDrift(expected_run_length=ARL, distance=distance, clear_fraction=1.0)
        onsets = 0
        seconds = 0.0
        for lo in range(0, evaluations, CHUNK):  # inputs built outside the timed loop
            pairs = [
                (grid_bins(a[i], edges), grid_bins(b[i], edges))
                for i in range(lo, min(lo + CHUNK, evaluations))
            ]
            start = cpu_clock()
            for x, y in pairs:
                det.update(x, y)
                onsets += det.alarm
            seconds += cpu_clock() - start
        us = seconds / evaluations * 1e6
        hit = 0
        for i in range(200):
            d2 = TwoSampleDrift(expected_run_length=ARL, distance=distance)
            d2.update(grid_bins(c[i], edges), grid_bins(b[i], edges))
            hit += d2.alarm
        print(f"| {distance} | {onsets / evaluations * 1e4:.1f} | {hit / 200:.0%} | {us:.0f} |")
    bench_summary_inputs(min(evaluations, 2_000))

    det = WindowDrift(expected_run_length=ARL, reference_intervals=24, window_intervals=6)
    counts = rng.multinomial(300, probs, size=evaluations + 30)
    seconds = 0.0
    for lo in range(0, evaluations + 30, CHUNK):
        inputs = [grid_bins(counts[i], edges) for i in range(lo, min(lo + CHUNK, len(counts)))]
        start = cpu_clock()
        for x in inputs:
            det.update(x)
        seconds += cpu_clock() - start
    us = seconds / (evaluations + 30) * 1e6
    print(
        f"\nWindowDrift (psi, reference 24 intervals, window 6, 300 values per interval): "
        f"{det.n_alarms / evaluations * 1e4:.1f} false alarms per 10,000 evaluations, "
        f"{us:.0f} us per update."
    )
    bench_window_summaries(min(evaluations, 2_000))

    det = CalibrationDrift(expected_run_length=ARL, window_intervals=1)
    p = rng.beta(2, 5, size=(evaluations, 300))
    y = rng.random(p.shape) < p
    idx = np.minimum((p * 10).astype(int), 9)
    inputs = [
        (
            np.bincount(idx[i], minlength=10),
            np.bincount(idx[i], weights=p[i], minlength=10),
            np.bincount(idx[i], weights=y[i], minlength=10),
        )
        for i in range(evaluations)
    ]
    start = cpu_clock()
    for args in inputs:
        det.update(*args)
    us = (cpu_clock() - start) / evaluations * 1e6
    # The same intervals through the default 12-interval window (the cost of the window sums).
    det12 = CalibrationDrift(expected_run_length=ARL)
    start = cpu_clock()
    for args in inputs:
        det12.update(*args)
    us12 = (cpu_clock() - start) / evaluations * 1e6
    print(
        f"CalibrationDrift (10 bins, 300 labelled predictions per interval, calibrated model): "
        f"{det.n_alarms / evaluations * 1e4:.1f} false alarms per 10,000 evaluations, "
        f"{us:.1f} us per update with a one-interval window, {us12:.1f} us with the default "
        f"{det12.window_intervals} ({det12.n_alarms / evaluations * 1e4:.1f} false alarms per "
        "10,000)."
    )
    hit = 0
    for _ in range(100):
        d2 = CalibrationDrift(expected_run_length=ARL, window_intervals=1)
        pp = rng.beta(2, 5, 2000)
        d2.update(*bin_predictions(pp, rng.random(pp.size) < pp * 0.85))
        hit += d2.alarm
    print(
        "A model whose true rate is 15% below its predictions, 2,000 labels in one interval: "
        f"flagged in {hit}% of evaluations.\n"
    )


def bench_batched(quick: bool) -> None:
    """TwoSampleDrift and WindowDrift update_many on Summaries by batch size, and in the
    evaluate engine."""
    print("### Batched histogram drift\n")
    rng = np.random.default_rng(402)
    pool = [Summary.from_values(rng.lognormal(0.0, 1.0, 1_000)) for _ in range(200)]
    print(
        "TwoSampleDrift psi on Summaries (1,000 lognormal values per arm, relative accuracy "
        "0.01), CPU time per detector update, inputs built outside the timed loop, best of 5; "
        "single = update() one detector at a time.\n"
    )
    for size, k, rounds in _batch_sizes(quick):
        pairs = [(pool[i % 200], pool[(7 * i + 1) % 200]) for i in range(k)]
        dets = [TwoSampleDrift(expected_run_length=ARL) for _ in range(k)]

        def one_round(_: int, dets: list = dets, pairs: list = pairs, size: Any = size) -> None:
            if size == "single":
                for det, (x, y) in zip(dets, pairs, strict=True):
                    det.update(x, y)
            else:
                TwoSampleDrift.update_many(dets, pairs)

        _print_batch_costs(size, k, dets, rounds, one_round)
    bench_window_batched(quick)
    bench_calibration_batched(quick)
    bench_engine_batched(quick, "control")
    bench_engine_batched(quick, "reference")


def bench_window_batched(quick: bool) -> None:
    """WindowDrift.update_many on Summaries by batch size (windows complete, evaluating)."""
    rng = np.random.default_rng(404)
    pool = [Summary.from_values(rng.lognormal(0.0, 1.0, 300)) for _ in range(200)]
    print(
        "\nWindowDrift psi on Summaries (300 lognormal values per interval, relative accuracy "
        "0.01, reference 24 intervals, window 6, both complete: every update evaluates), CPU "
        "time per detector update, inputs built outside the timed loop, best of 5.\n"
    )
    for size, k, rounds in _batch_sizes(quick):
        dets = [
            WindowDrift(expected_run_length=ARL, reference_intervals=24, window_intervals=6)
            for _ in range(k)
        ]
        for r in range(30):
            WindowDrift.update_many(dets, [pool[(r + 7 * i) % 200] for i in range(k)])
        inputs = [[pool[(13 * r + 7 * i) % 200] for i in range(k)] for r in range(rounds)]

        def one_round(r: int, dets: list = dets, inputs: list = inputs, size: Any = size) -> None:
            if size == "single":
                for det, x in zip(dets, inputs[r], strict=True):
                    det.update(x)
            else:
                WindowDrift.update_many(dets, inputs[r])

        _print_batch_costs(size, k, dets, rounds, one_round)


def calibration_intervals(rng: np.random.Generator, rounds: int, k: int) -> list[tuple]:
    """``rounds`` batches of ``k`` intervals of 300 labelled predictions of a calibrated model
    in 10 bins, each batch as (counts, prediction sums, outcome sums) (k, 10) arrays."""
    p = rng.beta(2, 5, size=(rounds, k, 300))
    y = rng.random(p.shape) < p
    idx = np.minimum((p * 10).astype(np.int64), 9)
    flat = (idx + 10 * np.arange(rounds * k).reshape(rounds, k, 1)).ravel()
    size = rounds * k * 10
    shape = (rounds, k, 10)
    c = np.bincount(flat, minlength=size).reshape(shape).astype(float)
    e = np.bincount(flat, weights=p.ravel(), minlength=size).reshape(shape)
    o = np.bincount(flat, weights=y.ravel(), minlength=size).reshape(shape)
    return [(c[r], e[r], o[r]) for r in range(rounds)]


def bench_calibration_batched(quick: bool) -> None:
    """CalibrationDrift.update_many by batch size (default 12-interval windows, full)."""
    print(
        "\nCalibrationDrift (10 bins, default 12-interval window, full: every update moves it; "
        "300 labelled predictions of a calibrated model per interval), CPU time per detector "
        "update, inputs built outside the timed loop, best of 5; single = update() one "
        "detector at a time.\n"
    )
    rng = np.random.default_rng(405)
    for size, k, rounds in _batch_sizes(quick):
        dets = [CalibrationDrift(expected_run_length=ARL) for _ in range(k)]
        for args in calibration_intervals(rng, 13, k):  # fill the windows
            CalibrationDrift.update_many(dets, *args)
        inputs = calibration_intervals(rng, rounds, k)

        def one_round(r: int, dets: list = dets, inputs: list = inputs, size: Any = size) -> None:
            counts, psums, osums = inputs[r]
            if size == "single":
                for det, c, e, o in zip(dets, counts, psums, osums, strict=True):
                    det.update(c, e, o)
            else:
                CalibrationDrift.update_many(dets, counts, psums, osums)

        _print_batch_costs(size, k, dets, rounds, one_round)


def _batch_sizes(quick: bool) -> Iterator[tuple[Any, int, int]]:
    """Print a batch-size table's header; yield (row label, detectors, rounds) per row: the
    single-update row times 1,000 detectors one by one; about 20,000 updates a row."""
    print("| batch size | update (us) | update + to_state (us) |")
    print("|---|---|---|")
    updates = 2_000 if quick else 20_000
    for size in ("single", 1, 10, 100, 1_000, 10_000):
        k = 1_000 if size == "single" else int(size)
        if quick and k > 1_000:
            continue
        yield size, k, max(1, updates // k)


def _print_batch_costs(
    size: Any, k: int, dets: list, rounds: int, one_round: Callable[[int], None]
) -> None:
    """One table row: CPU us per detector update, without and with a ``to_state()`` after
    each, best of 5 timings of ``rounds`` rounds."""
    costs = []
    for snapshot in (False, True):
        best = math.inf
        for _ in range(5):
            start = cpu_clock()
            for r in range(rounds):
                one_round(r)
                if snapshot:
                    for det in dets:
                        det.to_state()
            best = min(best, (cpu_clock() - start) / (rounds * k) * 1e6)
        costs.append(best)
    print(f"| {size if size == 'single' else f'{k:,}'} | {costs[0]:.1f} | {costs[1]:.1f} |")


def bench_engine_batched(quick: bool, mode: str) -> None:
    """Engine.apply_summaries at one tick of N experiments, each with one drift guardrail:
    treatment against control (``mode="control"``, one TwoSampleDrift per experiment) or each
    arm against its own reference window (``"reference"``, a WindowDrift per arm, its windows
    completed by 30 ticks first)."""
    import orjson

    from armguard.daemon.engine import Engine
    from armguard.daemon.experiments import parse_experiments

    n_exp = 1_000 if quick else 5_000
    config = parse_experiments(
        "experiments:\n"
        + "".join(
            f"  - {{id: e{i}, control: control, arms: {{control: 0.5, treatment: 0.5}}, "
            "srm: {enabled: false}, guardrails: [{metric: f, source: feature, test: drift, "
            f"mode: {mode}}}]}}\n"
            for i in range(n_exp)
        ),
        where="bench",
    )
    rng = np.random.default_rng(403)
    states = [Summary.from_values(rng.lognormal(0.0, 1.0, 1_000)).to_state() for _ in range(50)]

    def records(t: float, shift: int = 0) -> list[tuple[bytes, str, int, int]]:
        out = []
        for i in range(n_exp):
            arms = {
                arm: {
                    "count": 1_000,
                    "metrics": {},
                    "features": {"f": states[(i + j + shift) % 50]},
                }
                for j, arm in enumerate(("control", "treatment"))
            }
            doc = {
                "v": 1,
                "experiment": f"e{i}",
                "offsets": [],
                "span": {"max_ts": t},
                "arms": arms,
            }
            out.append((orjson.dumps(doc), "s", 0, i))
        return out

    cls = TwoSampleDrift if mode == "control" else WindowDrift
    # The drift updates' own CPU time, read inside the engine (the record totals move by more
    # than the drift cost between runs on this box).
    original = cls.__dict__["update_many"]
    spent = [0.0, 0]

    def timed(cls, detectors, inputs, **kw):
        start = cpu_clock()
        original.__func__(cls, detectors, inputs, **kw)
        spent[0] += cpu_clock() - start
        spent[1] += len(detectors)

    def run(engine: Engine, recs: list, batched: bool) -> float:
        """Apply the records; returns the CPU time of the snapshots the stage then writes (every
        changed experiment's, encoded), per experiment."""
        if batched:
            engine.apply_summaries(recs)
        else:
            for value, topic, partition, offset in recs:
                engine.apply_summary(value, topic=topic, partition=partition, offset=offset)
        start = cpu_clock()
        engine.snapshots()
        return (cpu_clock() - start) / n_exp * 1e6

    costs = {}
    cls.update_many = classmethod(timed)  # type: ignore[method-assign]
    try:
        if mode == "control":
            first, quiet, tick = records(5.0), records(6.0), records(15.0)  # interval 10 s
            for label, batched in (("one record at a time", False), ("apply_summaries", True)):
                best = {"quiet": math.inf, "tick": math.inf, "drift": math.inf, "snap": math.inf}
                for _ in range(5):
                    engine = Engine(config, evaluation_interval_s=10.0)
                    engine.apply_summaries(first)
                    engine.snapshots()
                    for name, recs in (("quiet", quiet), ("tick", tick)):
                        spent[:] = [0.0, 0]
                        start = cpu_clock()
                        snap = run(engine, recs, batched)
                        took = (cpu_clock() - start) / n_exp * 1e6 - snap
                        best[name] = min(best[name], took)
                        if name == "tick":
                            best["drift"] = min(best["drift"], spent[0] / spent[1] * 1e6)
                            best["snap"] = min(best["snap"], snap)
                costs[label] = best
        else:
            # One engine, its reference windows completed first (24 + 6 ticks); then each
            # measured tick moves the recent window on. A quiet record before each tick.
            engine = Engine(config, evaluation_interval_s=10.0)
            for k in range(31):
                engine.apply_summaries(records(10.0 * k + 5.0, shift=k))
            engine.snapshots()
            k = 31
            for label in ("one record at a time", "apply_summaries"):
                costs[label] = {
                    "quiet": math.inf,
                    "tick": math.inf,
                    "drift": math.inf,
                    "snap": math.inf,
                }
            for _ in range(5):
                for label, batched in (("one record at a time", False), ("apply_summaries", True)):
                    best = costs[label]
                    quiet = records(10.0 * k - 4.0, shift=k)
                    tick = records(10.0 * k + 5.0, shift=k)
                    k += 1
                    for name, recs in (("quiet", quiet), ("tick", tick)):
                        spent[:] = [0.0, 0]
                        start = cpu_clock()
                        snap = run(engine, recs, batched)
                        took = (cpu_clock() - start) / n_exp * 1e6 - snap
                        best[name] = min(best[name], took)
                        if name == "tick":
                            assert spent[1] == 2 * n_exp
                            best["drift"] = min(best["drift"], spent[0] / spent[1] * 1e6)
                            best["snap"] = min(best["snap"], snap)
    finally:
        cls.update_many = original  # type: ignore[method-assign]
    if mode == "control":
        what = "one treatment-vs-control drift guardrail (TwoSampleDrift)"
    else:
        what = "one reference-window drift guardrail (WindowDrift, on each of its 2 arms)"
    print(
        f"\nEvaluate engine, {n_exp:,} experiments with {what}, 1,000 values per arm and "
        "record, CPU time per summary record (most of it decoding the record's Summaries), "
        "per drift detector update inside it, and of the experiment's state snapshot written "
        "after the tick (Engine.snapshots: built and encoded), best of 5:\n"
    )
    print(
        "| engine call | record without tick (us) | record at a tick (us) | drift update (us) "
        "| snapshot after the tick (us) |"
    )
    print("|---|---|---|---|---|")
    for label, best in costs.items():
        drift = best["drift"]
        print(
            f"| {label} | {best['quiet']:.0f} | {best['tick']:.0f} | {drift:.1f} "
            f"| {best['snap']:.0f} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run counts (smoke test)")
    parser.add_argument(
        "--only",
        choices=["streams", "anomaly", "histograms", "batched", "calibration-batched"],
        help="run one section only",
    )
    args = parser.parse_args()
    quick = args.quick
    if args.only in (None, "streams"):
        if quick:
            bench_streams(runs_fa=2, n_fa=2000, runs_change=5, n_pre=500, n_post=1000)
        else:
            bench_streams(runs_fa=40, n_fa=5000, runs_change=80, n_pre=500, n_post=1000)
    if args.only in (None, "anomaly"):
        bench_anomaly(runs=2 if quick else 20)
    if args.only in (None, "histograms"):
        bench_histograms(evaluations=200 if quick else 10_000)
    if args.only in (None, "batched"):
        bench_batched(quick)
    if args.only == "calibration-batched":
        bench_calibration_batched(quick)


if __name__ == "__main__":
    main()
