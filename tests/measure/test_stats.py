"""fastdae.measure.stats and the report's significance section: hand-computed cases, and scipy.stats
(the reference implementation) where it is installed."""

from __future__ import annotations

import math

import pytest

from fastdae.evaluation import METRICS, mean_ci, pairwise_tests, welch
from fastdae.evaluation.report import markdown, significance_sentence
from fastdae.measure.stats import betainc, t_ppf, t_sf

DOFS = [1, 1.7, 2, 3.4, 4, 10, 57.3, 1000]


def test_t_distribution_closed_forms():
    # dof 1 is Cauchy: P(T > t) = 1/2 - atan(t)/pi; dof 2: P(T > t) = (1 - t / sqrt(2 + t^2)) / 2
    for t in (-3.0, -0.5, 0.0, 0.7, 2.0, 40.0):
        assert t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-12, abs=1e-15)
        assert t_sf(t, 2) == pytest.approx(0.5 * (1 - t / math.sqrt(2 + t * t)), rel=1e-12, abs=1e-15)
    assert t_ppf(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-12)
    # the textbook table: t_{0.975} for 2, 4 and 9 dof; the normal's 1.959964 in the limit
    assert [round(t_ppf(0.975, d), 3) for d in (2, 4, 9)] == [4.303, 2.776, 2.262]
    assert t_ppf(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    assert t_ppf(0.025, 4) == -t_ppf(0.975, 4) and t_ppf(0.5, 3) == pytest.approx(0.0, abs=1e-12)
    assert betainc(2.0, 3.0, 0.0) == 0.0 and betainc(2.0, 3.0, 1.0) == 1.0
    assert betainc(1.0, 1.0, 0.3) == pytest.approx(0.3, rel=1e-14)  # uniform
    assert betainc(2.0, 1.0, 0.3) == pytest.approx(0.09, rel=1e-13)  # I_x(a, 1) = x^a
    with pytest.raises(ValueError, match="q must be"):
        t_ppf(1.0, 3)
    with pytest.raises(ValueError, match="dof"):
        t_sf(1.0, 0)


def test_mean_ci_by_hand():
    # mean 2, sample std 1, n 3: half-width t_{0.975, 2} / sqrt(3) = 4.302653 / 1.732051
    s = mean_ci([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["n"]) == (2.0, 1.0, 3)
    half = 4.302652729749464 / math.sqrt(3)
    assert s["ci95"] == pytest.approx([2 - half, 2 + half], rel=1e-12)
    assert mean_ci([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1, "ci95": None}
    with pytest.raises(ValueError):
        mean_ci([])


def test_welch_by_hand():
    # a: mean 2, var 1; b: mean 6, var 4; n 3 each: se^2 = 1/3 + 4/3 = 5/3, t = -4 / sqrt(5/3),
    # dof = (5/3)^2 / ((1/3)^2 / 2 + (4/3)^2 / 2) = (25/9) / (17/18) = 50/17
    w = welch([1.0, 2.0, 3.0], [4.0, 6.0, 8.0])
    assert w["diff"] == -4.0 and (w["n_a"], w["n_b"]) == (3, 3)
    assert w["t"] == pytest.approx(-4 / math.sqrt(5 / 3), rel=1e-14)
    assert w["dof"] == pytest.approx(50 / 17, rel=1e-14)
    assert w["p"] == pytest.approx(2 * t_sf(abs(w["t"]), 50 / 17), rel=1e-14) and 0.05 < w["p"] < 0.2
    half = t_ppf(0.975, 50 / 17) * math.sqrt(5 / 3)
    assert w["ci95"] == pytest.approx([-4 - half, -4 + half])
    # not testable: one seed in an arm, or no spread in either
    for a, b in (([1.0], [1.5, 2.5]), ([1.0, 1.0], [2.0, 2.0])):
        w = welch(a, b)
        assert w["t"] is None and w["p"] is None and w["ci95"] is None and w["diff"] == pytest.approx(-1.0)


@pytest.mark.parametrize("dof", DOFS)
def test_t_matches_scipy(dof):
    stats = pytest.importorskip("scipy.stats")
    for q in (0.5, 0.9, 0.975, 0.995, 0.9999):
        assert t_ppf(q, dof) == pytest.approx(stats.t.ppf(q, dof), rel=1e-10, abs=1e-12)
    for t in (-5.0, -1.0, 0.0, 0.3, 2.1, 12.0):
        assert t_sf(t, dof) == pytest.approx(stats.t.sf(t, dof), rel=1e-10, abs=1e-300)


@pytest.mark.parametrize(
    "a, b",
    [
        ([41.2, 44.0, 39.5], [60.1, 58.3, 63.0, 59.9]),  # clearly apart, unequal n
        ([0.27, 0.29, 0.26], [0.28, 0.25, 0.3]),  # overlapping: p near 1
        ([1e3, 1.1e3, 0.9e3, 1.05e3, 0.97e3], [1.2e3, 0.6e3, 1.5e3]),  # very unequal variances
        ([3.0, 3.0, 3.1], [2.9, 3.3]),
    ],
)
def test_welch_matches_scipy(a, b):
    stats = pytest.importorskip("scipy.stats")
    ref = stats.ttest_ind(a, b, equal_var=False)
    w = welch(a, b)
    assert w["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert w["dof"] == pytest.approx(ref.df, rel=1e-12)
    assert w["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert w["ci95"] == pytest.approx(list(ref.confidence_interval(0.95)), rel=1e-9)
    s = mean_ci(a)
    lo, hi = stats.t.interval(0.95, len(a) - 1, loc=sum(a) / len(a), scale=stats.sem(a))
    assert s["ci95"] == pytest.approx([lo, hi], rel=1e-10)


def _runs():
    # fd_feat (lower is better): dae clearly lowest; psnr (higher is better): joint clearly highest;
    # ssim: the arms overlap; min_width: None everywhere (not measured, no test)
    return {
        "joint": [
            {"fd_feat": 60.0 + d, "psnr": 25.0 + d, "ssim": 0.8 + d / 100, "min_width": None} for d in (-1, 0, 1)
        ],
        "dae": [{"fd_feat": 40.0 + d, "psnr": 20.0 + d, "ssim": 0.8 - d / 100, "min_width": None} for d in (-1, 0, 1)],
        "control": [
            {"fd_feat": 58.0 + d, "psnr": 21.0 + d, "ssim": 0.8 + d / 50, "min_width": None} for d in (-1, 0, 1)
        ],
    }


def test_pairwise_tests_follow_each_metrics_direction():
    tests = {(t["a"], t["b"], t["metric"]): t for t in pairwise_tests(_runs())}
    assert {(a, b) for a, b, _ in tests} == {("dae", "joint"), ("dae", "control"), ("control", "joint")}
    assert {m for _, _, m in tests} == {"fd_feat", "psnr", "ssim"}  # min_width: no values
    t = tests["dae", "joint", "fd_feat"]
    assert t["diff"] == -20.0 and t["better"] == "dae" and t["p"] < 0.05  # lower FD-feat is better
    assert tests["dae", "joint", "psnr"]["better"] == "joint"  # higher PSNR is better
    assert tests["dae", "joint", "ssim"]["better"] is None and tests["dae", "joint", "ssim"]["p"] > 0.5
    assert pairwise_tests({"joint": _runs()["joint"]}) == []  # one arm: nothing to compare
    assert {k for k, _, _ in METRICS} >= {m for _, _, m in tests}


def test_significance_sentences():
    tests = {(t["a"], t["b"], t["metric"]): t for t in pairwise_tests(_runs())}
    s = significance_sentence(tests["dae", "joint", "fd_feat"])
    assert s.startswith("DAE beats joint on FD-feat (samples) by 20 (95% CI ") and "n = 3 vs 3 seeds" in s
    # the interval is of the improvement (positive), not of the signed difference
    lo, hi = (float(x) for x in s.split("95% CI ")[1].split(")")[0].split(" to "))
    assert 0 < lo < 20 < hi
    assert significance_sentence(tests["dae", "joint", "psnr"]).startswith("joint beats DAE on PSNR (dB) by 5 ")
    assert significance_sentence(tests["dae", "joint", "ssim"]).startswith(
        "No significant difference between DAE and joint on SSIM (p >= 0.05)"
    )
    one_seed = pairwise_tests({"dae": [{"psnr": 1.0}], "joint": [{"psnr": 2.0}]})
    assert "not testable" in significance_sentence(one_seed[0])


def test_markdown_has_intervals_and_a_sentence_per_test():
    from fastdae.evaluation.report import summarize

    runs = _runs()
    report = {
        "title": "t",
        "command": None,
        "seeds": 3,
        "device": "cpu",
        "torch": "x",
        "reference": {},
        "eval": {},
        "capacity": {},
        "summary": summarize(runs),
        "tests": pairwise_tests(runs),
    }
    md = markdown(report)
    half = t_ppf(0.975, 2) / math.sqrt(3)
    assert f"| FD-feat (samples) | ↓ | 60 ± 1 [{60 - half:.4g}, {60 + half:.4g}] |" in md
    assert "## Significance: Welch's t-test" in md and "### DAE vs joint" in md and "### control vs joint" in md
    assert "DAE is significantly better on 1, joint on 1, of 3 metrics." in md
    assert md.split("## Significance")[1].count("\n- ") == len(report["tests"]) == 9
    assert md.index("## Verdict") < md.index("| metric |") < md.index("## Significance")
