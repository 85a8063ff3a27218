"""Tests for streamcap.stats: the metric registry and its Prometheus text output."""

from __future__ import annotations

import re

import pytest

from streamcap.stats import Metrics

LINE = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+Inf]+$')


def test_counter_gauge_and_histogram_render_in_text_format() -> None:
    m = Metrics()
    c = m.counter("streamcap_windows_total", "Windows cut", ["source"])
    c.inc(1, "kitchen")
    c.inc(2, "kitchen")
    g = m.gauge("streamcap_lag_seconds", "Lag")
    g.set(1.5)
    g.inc(-0.5)
    h = m.histogram("streamcap_inference_seconds", "Time", buckets=(0.5, 1.0))
    h.observe(0.2)
    h.observe(0.7)
    h.observe(3.0)
    text = m.render()
    assert 'streamcap_windows_total{source="kitchen"} 3' in text
    assert "streamcap_lag_seconds 1" in text
    assert 'streamcap_inference_seconds_bucket{le="0.5"} 1' in text
    assert 'streamcap_inference_seconds_bucket{le="1.0"} 2' in text
    assert 'streamcap_inference_seconds_bucket{le="+Inf"} 3' in text
    assert "streamcap_inference_seconds_count 3" in text
    assert "# TYPE streamcap_windows_total counter" in text
    for line in text.splitlines():
        assert line.startswith("# ") or LINE.match(line), line
    assert c.value("kitchen") == 3 and g.value() == 1.0 and h.count() == 3


def test_unlabelled_series_render_zero_before_use() -> None:
    m = Metrics()
    m.counter("streamcap_x_total", "x")
    m.gauge("streamcap_y", "y")
    assert "streamcap_x_total 0" in m.render()
    assert "streamcap_y 0" in m.render()


def test_label_values_are_escaped() -> None:
    m = Metrics()
    m.counter("streamcap_z_total", "z", ["source"]).inc(1, 'a"b\\c')
    assert 'source="a\\"b\\\\c"' in m.render()


def test_misuse_is_refused() -> None:
    m = Metrics()
    c = m.counter("streamcap_a_total", "a", ["source"])
    with pytest.raises(ValueError, match="only goes up"):
        c.inc(-1, "k")
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(1)
    with pytest.raises(ValueError, match="must match"):
        m.gauge("windows", "no prefix")
    with pytest.raises(ValueError, match="already registered differently"):
        m.gauge("streamcap_a_total", "a", ["source"])
    assert m.counter("streamcap_a_total", "a", ["source"]) is c


def test_each_registry_is_its_own() -> None:
    """Two daemons in one process: the same names in two registries do not clash."""
    a, b = Metrics(), Metrics()
    a.counter("streamcap_w_total", "w", ["source"]).inc(2, "x")
    b.counter("streamcap_w_total", "w", ["source"]).inc(5, "x")
    assert 'streamcap_w_total{source="x"} 2.0' in a.render()
    assert 'streamcap_w_total{source="x"} 5.0' in b.render()


def test_process_series_and_no_created_series() -> None:
    m = Metrics()
    m.counter("streamcap_c_total", "c")
    m.histogram("streamcap_h_seconds", "h").observe(0.1)
    text = m.render()
    assert "# TYPE process_cpu_seconds_total counter" in text
    assert "process_resident_memory_bytes " in text
    assert "_created" not in text


def test_counter_names_end_in_total() -> None:
    with pytest.raises(ValueError, match="must end in _total"):
        Metrics().counter("streamcap_windows", "no suffix")


def test_help_text_is_escaped() -> None:
    m = Metrics()
    m.gauge("streamcap_q", "a back\\slash\nand a newline")
    assert "# HELP streamcap_q a back\\\\slash\\nand a newline" in m.render()
