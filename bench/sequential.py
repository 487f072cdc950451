"""Benchmark of armguard's anytime-valid guardrail tests against the `savvi` package.

For each case it prints the A/A false-positive rate (a look after every batch, up to the
horizon) with a 95% Wilson interval, and the median and 90th percentile of the samples per arm
needed to detect the effect, for:

* armguard, one-sided in the harmful direction: with the default ``tuning_n``, with
  ``tuning_n_for(effect)`` (the half-normal mixture tuned to the smallest effect the guardrail
  must catch), and with ``effect=`` (the mixture centred on that effect);
* savvi 0.3 (Lindon et al.): the anytime-valid linear-model t-test (``LinearRegression``,
  ``y ~ 1 + treatment``) for means and proportions, with its default ``phi = 1`` and with ``phi``
  matched to armguard's tuning; ``Multinomial`` (default ``k = 100``) for SRM.

Every statistic is a function of the cumulative per-arm sums, so paths are simulated as numpy
arrays and each method's own statistic is evaluated on them: armguard's through the test class's
vectorised evidence, savvi's through ``savvi.linear_regression.log_bf`` and the Dirichlet-
multinomial formula of ``savvi.Multinomial`` (checked against savvi's classes on a few paths
before the run). savvi is optional: the bench says so and goes on when it is missing.

Run: ``.venv/bin/python bench/sequential.py [--paths 1000] [--seed 1]``
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import special

from armguard.detectors import (
    MeanDifferenceTest,
    ProportionDifferenceTest,
    SampleRatioMismatch,
    _mixture,
)

try:  # savvi is a bench-only dependency
    import savvi.linear_regression as savvi_lr
    from savvi.multinomial import Multinomial as SavviMultinomial
except ImportError as exc:  # pragma: no cover - depends on the environment
    savvi_lr = None
    SAVVI_MISSING = f"{type(exc).__name__}: {exc}"
else:
    SAVVI_MISSING = ""

ALPHA = 0.05  # guardrail tests
TARGETS = {  # median samples per arm of the best public method, from the issue
    "error rate 1.0% -> 1.3%": 17_500,
    "conversion 10% -> 9%": 11_600,
    "latency +2% (sd 30%)": 3_000,
}
SRM_ALPHA = 0.001


# -- simulation of cumulative per-arm sums ---------------------------------------------------------


def _cumulative(batch, sums, sumsq):
    n = np.broadcast_to(batch * np.arange(1, sums.shape[1] + 1, dtype=float), sums.shape)
    s, ss = np.cumsum(sums, 1), np.cumsum(sumsq, 1)
    return n, s, np.maximum(ss - s * s / n, 0.0)


def simulate(rng, kind, params, paths, looks, batch):
    if kind == "binary":
        x = rng.binomial(batch, params["p"], size=(paths, looks)).astype(float)
        return _cumulative(batch, x, x)
    if kind == "gaussian":
        mean, sd = params["mean"], params["sd"]
        s = rng.normal(batch * mean, sd * math.sqrt(batch), size=(paths, looks))
        m2 = sd * sd * rng.chisquare(batch - 1, size=(paths, looks))
        return _cumulative(batch, s, m2 + s * s / batch)
    if kind == "lognormal":
        sums = np.empty((paths, looks))
        sumsq = np.empty((paths, looks))
        for i in range(0, looks, 50):  # bounded memory
            x = rng.lognormal(
                params["mu"], params["sigma"], size=(paths, min(50, looks - i), batch)
            )
            sums[:, i : i + 50] = x.sum(2)
            sumsq[:, i : i + 50] = np.einsum("plb,plb->pl", x, x)
        return _cumulative(batch, sums, sumsq)
    raise ValueError(kind)


# -- the methods: log evidence per (path, look) ---------------------------------------------------


def savvi_log_evidence(control, treatment, phi):
    """savvi's LinearRegression(y ~ 1 + treatment) Bayes factor for the treatment coefficient."""
    n_c, s_c, m2_c = control
    n_t, s_t, m2_t = treatment
    n = n_c + n_t
    beta = s_t / n_t - s_c / n_c
    inv_info = 1.0 / n_t + 1.0 / n_c  # (X'X)^-1 for the treatment coefficient
    nu = n - 3  # savvi: n - p - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma2 = (m2_c + m2_t) / (n - 2)  # OLS residual variance, p = 2 coefficients
        t2 = beta * beta / (sigma2 * inv_info)
        log_e = savvi_lr.log_bf(t2, nu, phi, 1.0 / inv_info)
    return np.where(nu > 0, log_e, 0.0)


def savvi_srm_log_evidence(counts, theta, k=100.0):
    """savvi.Multinomial's log posterior odds (telescoped Dirichlet-multinomial Bayes factor)."""
    a = k * np.asarray(theta)
    x = counts.astype(float)

    def log_b(v):
        return special.gammaln(v).sum(-1) - special.gammaln(v.sum(-1))

    return log_b(a + x) - log_b(a) - (x * np.log(theta)).sum(-1)


def check_savvi_reconstruction(rng):
    """Our vectorised savvi statistics equal savvi's own classes on a few short paths."""
    for _ in range(2):
        y_c = rng.normal(1.0, 1.0, 120)
        y_t = rng.normal(1.3, 1.0, 120)
        model = savvi_lr.LinearRegression(alpha=ALPHA, p=2)
        ours = []
        for i in range(120):
            for y, arm in ((y_c[i], 0.0), (y_t[i], 1.0)):
                model.update(np.array([y, 1.0, arm]))
            model.infer()
            ours.append(model.p_value[1])
        n = np.arange(1, 121, dtype=float)[None, :]
        arms = []
        for y in (y_c, y_t):
            s = np.cumsum(y)[None, :]
            arms.append((n, s, np.cumsum(y * y)[None, :] - s * s / n))
        log_e = savvi_log_evidence(arms[0], arms[1], 1.0)[0]
        p = np.minimum.accumulate(np.minimum(1.0, np.exp(-log_e)))
        late = slice(20, None)  # savvi's 1e6 ridge prior matters only for the first few units
        np.testing.assert_allclose(p[late], np.array(ours)[late], rtol=1e-3, atol=1e-6)
    theta = np.array([0.5, 0.5])
    m = SavviMultinomial(alpha=SRM_ALPHA, theta_0=theta)
    counts = rng.multinomial(300, [0.48, 0.52], size=20)
    for row in counts:
        m.update(row)
    got = savvi_srm_log_evidence(counts.cumsum(0)[-1][None, :], theta)[0]
    assert math.isclose(got, math.log(m.odds), rel_tol=1e-9), (got, math.log(m.odds))


# -- summaries of a run ---------------------------------------------------------------------------


def first_detection(log_e, alpha, per_look):
    hit = log_e >= -math.log(alpha)
    first = np.where(hit.any(1), hit.argmax(1), -1)
    samples = np.where(first >= 0, (first + 1) * per_look, np.inf)
    return samples


def wilson(k, n, z=1.96):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), centre + half


def fmt_delay(samples):
    med = np.quantile(samples, 0.5)
    p90 = np.quantile(samples, 0.9)

    def f(v):
        return ">horizon" if not np.isfinite(v) else f"{v:,.0f}"

    return med, f(med), f(p90), float(np.mean(np.isfinite(samples)))


@dataclass
class Case:
    name: str
    kind: str
    control: dict
    treatment: dict
    harmful: str
    batch: int  # per arm per look (SRM: units per look, all arms)
    looks: int
    effect: float = 0.0
    pair_variance: float = 0.0
    baseline: float = 0.0


def cases():
    sd_ln = 1.0
    mu = math.log(100.0) - sd_ln**2 / 2  # mean 100
    ln_var = (math.exp(sd_ln**2) - 1) * 100.0**2
    return [
        Case("error rate 1.0% -> 1.3%", "binary", {"p": 0.010}, {"p": 0.013}, "increase",
             100, 900, effect=0.003, baseline=0.010),
        Case("conversion 10% -> 9%", "binary", {"p": 0.10}, {"p": 0.09}, "decrease",
             100, 600, effect=-0.01, baseline=0.10),
        Case("latency +2% (sd 30%)", "gaussian", {"mean": 100.0, "sd": 30.0},
             {"mean": 102.0, "sd": 30.6}, "increase", 25, 800, effect=2.0,
             pair_variance=30.0**2 + 30.6**2),
        Case("lognormal latency +15% (sigma 1)", "lognormal", {"mu": mu, "sigma": sd_ln},
             {"mu": mu + math.log(1.15), "sigma": sd_ln}, "increase", 20, 400, effect=15.0,
             pair_variance=ln_var * (1 + 1.15**2)),
        Case("SRM 50/50 -> 49/51", "srm", {"p": 0.5}, {"p": 0.51}, "any", 500, 800),
    ]  # fmt: skip


def tuned_n(case):
    if case.kind == "binary":
        return ProportionDifferenceTest.tuning_n_for(
            baseline=case.baseline, effect=case.effect, alpha=ALPHA, harmful=case.harmful
        )
    sd_c = math.sqrt(case.pair_variance / 2)
    return MeanDifferenceTest.tuning_n_for(
        effect=case.effect, sd=sd_c, alpha=ALPHA, harmful=case.harmful
    )


def run_two_arm(case, rng, paths, aa_paths):
    cls = ProportionDifferenceTest if case.kind == "binary" else MeanDifferenceTest
    tn = tuned_n(case)
    effect = abs(case.effect)
    methods = {
        "armguard default": cls(alpha=ALPHA, harmful=case.harmful),
        f"armguard tuned (tuning_n={tn:,})": cls(alpha=ALPHA, harmful=case.harmful, tuning_n=tn),
        f"armguard effect={effect:g}": cls(alpha=ALPHA, harmful=case.harmful, effect=effect),
    }
    c_two = _mixture.tuning_constant(ALPHA, "two")
    savvi_methods = {"savvi phi=1 (default)": 1.0, "savvi phi matched": tn / (2 * c_two)}
    rows = []
    aa_c = simulate(rng, case.kind, case.control, aa_paths, case.looks, case.batch)
    aa_t = simulate(rng, case.kind, case.control, aa_paths, case.looks, case.batch)
    c = simulate(rng, case.kind, case.control, paths, case.looks, case.batch)
    t = simulate(rng, case.kind, case.treatment, paths, case.looks, case.batch)
    for name, test in methods.items():
        aa = first_detection(test._log_e_paths(aa_c, aa_t), ALPHA, case.batch)
        delay = first_detection(test._log_e_paths(c, t), ALPHA, case.batch)
        rows.append((name, aa, delay))
    if savvi_lr is not None:
        for name, phi in savvi_methods.items():
            aa = first_detection(savvi_log_evidence(aa_c, aa_t, phi), ALPHA, case.batch)
            delay = first_detection(savvi_log_evidence(c, t, phi), ALPHA, case.batch)
            rows.append((name, aa, delay))
    return rows


def run_srm(case, rng, paths, aa_paths):
    theta = np.array([0.5, 0.5])
    srm = SampleRatioMismatch(allocation={"control": 0.5, "treatment": 0.5}, alpha=SRM_ALPHA)
    aa_paths = max(aa_paths, 10_000)  # alpha = 0.001 needs many paths to be measured
    aa = rng.multinomial(case.batch, theta, size=(aa_paths, case.looks)).cumsum(1)
    eff = rng.multinomial(case.batch, [0.49, 0.51], size=(paths, case.looks)).cumsum(1)
    per_arm = case.batch / 2
    rows = [
        (
            "armguard (tuning_n=50,000)",
            first_detection(srm._log_bf_paths(aa), SRM_ALPHA, per_arm),
            first_detection(srm._log_bf_paths(eff), SRM_ALPHA, per_arm),
        )
    ]
    if savvi_lr is not None:
        rows.append(
            (
                "savvi Multinomial k=100",
                first_detection(savvi_srm_log_evidence(aa, theta), SRM_ALPHA, per_arm),
                first_detection(savvi_srm_log_evidence(eff, theta), SRM_ALPHA, per_arm),
            )
        )
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", type=int, default=1000, help="effect paths per case")
    ap.add_argument("--aa-paths", type=int, default=2000, help="A/A paths per case")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    if savvi_lr is None:
        print(f"savvi is missing ({SAVVI_MISSING}); install it with `.venv/bin/pip install savvi`")
        print("to compare. Running armguard only.\n")
    else:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # savvi's first updates divide by 0
            check_savvi_reconstruction(rng)
    print(
        f"alpha {ALPHA} (guardrails, one-sided in the harmful direction), SRM alpha {SRM_ALPHA};"
        f" a look after every batch; {args.aa_paths} A/A and {args.paths} effect paths per case"
    )
    for case in cases():
        t0 = time.perf_counter()
        run = run_srm if case.kind == "srm" else run_two_arm
        rows = run(case, rng, args.paths, args.aa_paths)
        horizon = case.looks * case.batch / (2 if case.kind == "srm" else 1)
        unit = "units per arm" if case.kind == "srm" else "samples per arm"
        print(
            f"\n## {case.name}  (batch {case.batch}/look, horizon {horizon:,.0f} {unit},"
            f" {time.perf_counter() - t0:.1f}s)"
        )
        print(
            f"{'method':38s} {'A/A FPR [95% CI]':>24s} {'median':>9s} {'p90':>9s} {'detected':>9s}"
        )
        medians = {}
        for name, aa, delay in rows:
            p, lo, hi = wilson(int(np.isfinite(aa).sum()), aa.size)
            med, med_s, p90_s, det = fmt_delay(delay)
            medians[name] = med
            print(f"{name:38s} {p:8.4f} [{lo:.4f}, {hi:.4f}] {med_s:>9s} {p90_s:>9s} {det:9.1%}")
        if case.name in TARGETS:
            print(f"issue's reference (one-sided normal-mixture CS): median {TARGETS[case.name]:,}")
        ours = [v for k, v in medians.items() if k.startswith("armguard")]
        theirs = {k: v for k, v in medians.items() if k.startswith("savvi")}
        best_ours = min(ours)
        for k, v in theirs.items():
            print(f"ratio of armguard's best median to {k}: {best_ours / v:.3f}")
        if not theirs:
            print("savvi missing: no ratio")


if __name__ == "__main__":
    main()
