"""Build summary records in the ingest stage's format, for evaluate-stage tests."""

from __future__ import annotations

import numpy as np
import orjson

from armguard.detectors.summary import Summary

# A 3-arm experiment with kill guardrails on errors and latency, a shadow guardrail and SRM: the
# experiment the evaluate-stage tests (unit and integration) run against.
RANKER_EXPERIMENTS = """
experiments:
  - id: ranker
    control: control
    arms: {control: 0.34, t1: 0.33, t2: 0.33}
    alpha: 0.05
    guardrails:
      - {metric: error, test: proportion, harmful: increase, min_samples: 500, action: kill}
      - {metric: latency_ms, test: mean, harmful: increase, margin: "2%", min_samples: 500, action: kill}
      - {name: latency-shadow, metric: latency_ms, test: mean, harmful: increase, min_samples: 500,
         action: kill, shadow: true}
    srm: {alpha: 0.001, action: alert, min_samples: 1000}
"""


def summary_record(experiment, arms, *, t0, t1, offset_first, offset_last, partition=0):
    """One summaries-topic value: ``arms`` maps arm -> metric name -> values."""
    out = {}
    for arm, metrics in arms.items():
        states = {}
        n = 0
        for name, values in metrics.items():
            s = Summary()
            s.update_many(np.asarray(values, dtype=float))
            states[name] = s.to_state()
            n = len(values)
        out[arm] = {"count": n, "metrics": states, "features": {}}
    return orjson.dumps(
        {
            "v": 1,
            "experiment": experiment,
            "config_version": "test",
            "source": {"topic": "telemetry", "partition": partition},
            "offsets": [
                {
                    "topic": "telemetry",
                    "partition": partition,
                    "first": offset_first,
                    "last": offset_last,
                }
            ],
            "span": {"min_ts": t0, "max_ts": t1},
            "arms": out,
        }
    )


def regression_stream(
    seed,
    *,
    experiment="ranker",
    arms=("control", "t1", "t2"),
    n_batches,
    per_arm=400,
    bad_arm=None,
    start_batch_bad=0,
    err_bad=0.05,
    lat_bad=1.3,
    t_start=1_764_300_000.0,
):
    """Summary records of an experiment; ``bad_arm`` regresses from ``start_batch_bad`` on."""
    rng = np.random.default_rng(seed)
    recs = []
    off = 0
    for b in range(n_batches):
        data = {}
        for arm in arms:
            bad = arm == bad_arm and b >= start_batch_bad
            p = err_bad if bad else 0.01
            scale = lat_bad if bad else 1.0
            data[arm] = {
                "error": (rng.random(per_arm) < p).astype(float),
                "latency_ms": rng.lognormal(4.0, 0.3, per_arm) * scale,
            }
        t = t_start + b * 5
        recs.append(
            summary_record(
                experiment,
                data,
                t0=t,
                t1=t + 5,
                offset_first=off,
                offset_last=off + len(arms) * per_arm - 1,
            )
        )
        off += len(arms) * per_arm
    return recs
