"""GLAD serving metrics (issue 27): the known label values and buckets of ``glad_runtime.serving.metrics_spec``,
and ``glad_bls.Metrics`` over a fake ``triton_python_backend_utils`` (every family exported at zero from the
start; metrics never fail). No Triton needed."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from glad_runtime import errors
from glad_runtime.core.calibration import Calibration
from glad_runtime.core.detection import ADS_STATES
from glad_runtime.serving import metrics_spec
from glad_runtime.serving.metrics_spec import (DEFAULT_SCORE_BUCKETS, known_series, normalized_score_buckets,
                                               score_buckets)

GLAD_BLS = Path(__file__).resolve().parents[2] / "triton_models" / "python" / "glad_bls.py"


def _calibration(seed=0, scale=0.5, n=200):
    rng = np.random.default_rng(seed)
    return Calibration.from_normals(scale * (1.0 + rng.random(n)), target_fpr=0.01)


def _assert_bounds(b):
    assert b and all(isinstance(x, float) for x in b)
    assert all(x > 0 and np.isfinite(x) for x in b)
    assert all(lo < hi for lo, hi in zip(b, b[1:])), b  # strictly increasing (sorted, no duplicates)


# ---------------------------------------------------------------------------------------------------- buckets
@pytest.mark.parametrize("scale", [1e-4, 0.5, 3.0, 2e3])
def test_score_buckets_resolve_the_operating_point(scale):
    cal = _calibration(scale=scale)
    b = score_buckets(cal)
    _assert_bounds(b)
    t = cal.image_threshold
    assert t in b  # exactly: the bucket le=threshold counts the images labelled normal
    i = b.index(t)
    assert 0 < i < len(b) - 1
    assert b[i - 1] >= 0.9 * t and b[i + 1] <= 1.1 * t  # neighbours within 10 %
    assert sum(0.8 * t <= x <= 1.2 * t for x in b) >= 7  # dense around it
    assert b[0] <= 0.2 * t and b[-1] >= 5 * t  # coarse tails
    for q in ("q50", "q90", "q95", "q99"):  # the normal-score quantiles are (near) bounds
        v = cal.image_stats[q]
        assert min(abs(x - v) for x in b) <= 1e-3 * v, (q, v, b)


def test_score_buckets_accept_the_calibration_dict_and_drop_bad_quantiles():
    cal = _calibration()
    assert score_buckets(cal.to_dict()) == score_buckets(cal)
    d = dict(image_threshold=0.62, image_stats={"q50": 0.4, "q90": -1.0, "q95": float("nan"), "q99": 0.62,
                                                "mean": 0.33, "max": 0.7})
    b = score_buckets(d)
    _assert_bounds(b)
    assert 0.4 in b and 0.33 not in b and 0.7 not in b  # quantiles only, positive and finite only
    assert b.count(0.62) == 1 and 0.93 in b  # merged with the threshold; 1.5 x 0.62 reads 0.93, not 0.929999...


def test_score_buckets_default_without_a_usable_threshold():
    default = score_buckets(None)
    _assert_bounds(default)
    assert default == list(DEFAULT_SCORE_BUCKETS) and default[0] == 1e-3 and default[-1] == 100.0
    assert [x for x in default if 0.1 <= x <= 1.0] == [0.1, 0.2, 0.5, 1.0]  # 1-2-5 per decade: finer than 1-3
    for bad in (dict(image_threshold=0.0), dict(image_threshold=-0.5), dict(image_threshold=float("inf")), {}):
        assert score_buckets(bad) == default


def test_normalized_and_adaptive_step_buckets():
    b = normalized_score_buckets()
    _assert_bounds(b)
    assert b[-1] == 1.0 and {0.45, 0.5, 0.55} <= set(b) and 0.3 in b  # 0.3, not 0.30000000000000004
    assert metrics_spec.adaptive_step_buckets(1000) == list(range(100, 1001, 100))
    assert metrics_spec.adaptive_step_buckets(0) == sorted(set(metrics_spec.adaptive_step_buckets(1)))


# ---------------------------------------------------------------------------------------------- known series
def test_known_label_values_match_the_runtime():
    assert metrics_spec.ADS_STATES == ADS_STATES
    for name in metrics_spec.ERROR_TYPES:
        assert issubclass(getattr(errors, name), errors.GladError), name
    assert metrics_spec.MALFORMED_REASONS == ("empty", "no_input", "both_inputs", "too_many_images",
                                              "bad_parameter", "bad_tensor")


def test_known_series():
    plain, inflight = known_series(), known_series(inflight=True)
    names = {n for n, _, _ in plain}
    assert names == {"glad_images_total", "glad_errors_total", "glad_requests_abandoned_total",
                     "glad_ads_decisions_total", "glad_requests_malformed_total", "glad_ddim_steps_saved_total",
                     "glad_adaptive_step", "glad_score", "glad_normalized_score"}
    assert {n for n, _, _ in inflight} - names == {"glad_requests_rejected_total", "glad_inflight_images"}
    assert ("glad_errors_total", "COUNTER", {"type": "ImageTooLargeError"}) in plain
    assert ("glad_inflight_images", "GAUGE", {}) in inflight
    assert {k for n, k, _ in inflight if n.endswith("_total")} == {"COUNTER"}
    reasons = [lab["reason"] for n, _, lab in plain if n == "glad_requests_malformed_total"]
    assert reasons == list(metrics_spec.MALFORMED_REASONS)


# -------------------------------------------------------------------------------- glad_bls.Metrics, fake pb_utils
class _Metric:
    def __init__(self, family, labels, buckets):
        self.family, self.labels, self.buckets, self.value, self.observed = family, labels, buckets, 0.0, []

    def increment(self, v):
        self.value += v

    def set(self, v):
        self.value = v

    def observe(self, v):
        self.observed.append(v)


def _fake_pb_utils(histograms=True, broken=False):
    series = []

    class MetricFamily:
        COUNTER, GAUGE = "COUNTER", "GAUGE"

        def __init__(self, name, description, kind):
            if broken:
                raise RuntimeError("metrics disabled")
            assert description
            self.name, self.kind = name, kind

        def Metric(self, labels, buckets=None):  # noqa: N802 (Triton's name)
            assert (buckets is not None) == (self.kind == "HISTOGRAM")
            m = _Metric(self, labels, buckets)
            series.append(m)
            return m

    if histograms:
        MetricFamily.HISTOGRAM = "HISTOGRAM"
    return types.SimpleNamespace(MetricFamily=MetricFamily, series=series)


def _load_glad_bls(monkeypatch, pb):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("glad_bls_under_test", GLAD_BLS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _by_name(series):
    out = {}
    for m in series:
        out.setdefault(m.family.name, []).append(m)
    return out


@pytest.mark.parametrize("inflight", [False, True])
def test_metrics_exports_every_family_at_zero(monkeypatch, inflight):
    pb = _fake_pb_utils()
    cal = _calibration()
    metrics = _load_glad_bls(monkeypatch, pb).Metrics("line_glad", types.SimpleNamespace(t_max=1000),
                                                      calibration=cal, inflight=inflight)
    fams = _by_name(pb.series)
    assert set(fams) == {n for n, _, _ in known_series(inflight)}
    assert len(pb.series) == len(known_series(inflight))
    assert all(m.labels["model"] == "line_glad" and m.value == 0 and not m.observed for m in pb.series)
    assert {m.labels["type"] for m in fams["glad_errors_total"]} == set(metrics_spec.ERROR_TYPES)
    assert {m.labels["reason"] for m in fams["glad_requests_malformed_total"]} == set(metrics_spec.MALFORMED_REASONS)
    assert {m.labels["state"] for m in fams["glad_ads_decisions_total"]} == set(ADS_STATES)
    (score,) = fams["glad_score"]
    assert score.buckets == score_buckets(cal) and cal.image_threshold in score.buckets
    # counting reuses the zero series; a new label value adds one
    metrics.inc("glad_requests_malformed_total", reason="bad_tensor")
    metrics.inc("glad_errors_total", type="ImageTooLargeError")
    metrics.inc("glad_errors_total", type="SomethingNew")
    assert len(pb.series) == len(known_series(inflight)) + 1
    hits = {(m.family.name, tuple(sorted(m.labels.items()))): m.value for m in pb.series if m.value}
    assert hits == {("glad_requests_malformed_total", (("model", "line_glad"), ("reason", "bad_tensor"))): 1.0,
                    ("glad_errors_total", (("model", "line_glad"), ("type", "ImageTooLargeError"))): 1.0,
                    ("glad_errors_total", (("model", "line_glad"), ("type", "SomethingNew"))): 1.0}


def test_metrics_default_buckets_and_old_call(monkeypatch):
    pb = _fake_pb_utils()
    _load_glad_bls(monkeypatch, pb).Metrics("m", types.SimpleNamespace(t_max=10))  # the call before issue 27
    fams = _by_name(pb.series)
    assert fams["glad_score"][0].buckets == list(DEFAULT_SCORE_BUCKETS)
    assert "glad_requests_rejected_total" not in fams and "glad_inflight_images" not in fams


def test_metrics_never_fail(monkeypatch):
    cfg = types.SimpleNamespace(t_max=10)
    # no histogram kind (old Triton): counters at zero, histograms only once observed (a gauge of the last value)
    pb = _fake_pb_utils(histograms=False)
    metrics = _load_glad_bls(monkeypatch, pb).Metrics("m", cfg, calibration=_calibration())
    assert not {"glad_score", "glad_adaptive_step", "glad_normalized_score"} & set(_by_name(pb.series))
    metrics.observe("glad_score", 0.7)
    assert _by_name(pb.series)["glad_score"][0].value == 0.7
    # a failing metrics API, or none at all, and an odd calibration: nothing raises
    pb = _fake_pb_utils(broken=True)
    metrics = _load_glad_bls(monkeypatch, pb).Metrics("m", cfg, calibration=object(), inflight=True)
    metrics.inc("glad_requests_malformed_total", reason="empty")
    metrics.set("glad_inflight_images", 3)
    metrics.observe("glad_score", 0.5)
    assert pb.series == []
    metrics = _load_glad_bls(monkeypatch, types.SimpleNamespace()).Metrics("m", cfg, inflight=True)
    assert not metrics.ok
    metrics.inc("glad_errors_total", type="EngineError")
