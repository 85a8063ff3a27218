"""In-process metrics: counters, gauges and histograms, exposed in the Prometheus text format.

A thin layer over ``prometheus_client``: each :class:`Metrics` owns its own
``CollectorRegistry`` (never the library's global one, so that several daemons
can live in one process, as in the tests), with the process collector
(``process_*`` series) registered on it. ``prometheus_client`` does the
storage, the thread safety, the label escaping and the exposition; this module
keeps the small API the rest of streamcap uses (``counter``/``gauge``/
``histogram`` with positional label values) and checks names once: every
metric is ``streamcap_*``, every counter ends in ``_total``.

The ``*_created`` series of counters and histograms are not exported
(``disable_created_metrics``, process-wide): streamcap never exposed them and
nothing it serves needs them.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, Generic, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

_NAME_RE: Final = re.compile(r"^streamcap_[a-z0-9_]+$")
DEFAULT_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE: Final[str] = CONTENT_TYPE_PLAIN_0_0_4
"""The content type of :meth:`Metrics.render`: the Prometheus text format 0.0.4."""

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


_Impl = TypeVar("_Impl", prometheus_client.Counter, prometheus_client.Gauge,
                 prometheus_client.Histogram)


class _Metric(Generic[_Impl]):
    """One metric family: a prometheus_client metric plus the label-count check."""

    kind = "untyped"

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str,
                 labelnames: Sequence[str], impl: type[_Impl], **options: Any) -> None:
        self.name = name
        self.labelnames = tuple(labelnames)
        self._registry = registry
        self._impl: _Impl = impl(name, help_text, self.labelnames, registry=registry, **options)

    def _series(self, values: Sequence[str]) -> _Impl:
        """The child of one label set (the metric itself when it has no labels)."""
        labels = self._labels(values)
        if not labels:
            return self._impl
        child: _Impl = self._impl.labels(**labels)
        return child

    def _labels(self, values: Sequence[str]) -> dict[str, str]:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(values)}")
        return {n: str(v) for n, v in zip(self.labelnames, values, strict=True)}

    def _sample(self, sample_name: str, values: Sequence[str]) -> float:
        found = self._registry.get_sample_value(sample_name, self._labels(values))
        return 0.0 if found is None else found


class _Scalar(_Metric[_Impl]):
    """One float per label set: counters and gauges."""

    def value(self, *labels: str) -> float:
        """The current value of one series (0 for a label set never used)."""
        return self._sample(self.name, labels)


class Counter(_Scalar[prometheus_client.Counter]):
    """A monotonically increasing count."""

    kind = "counter"

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str,
                 labelnames: Sequence[str] = ()) -> None:
        super().__init__(registry, name, help_text, labelnames, prometheus_client.Counter)

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._series(labels).inc(amount)


class Gauge(_Scalar[prometheus_client.Gauge]):
    """A value that goes up and down."""

    kind = "gauge"

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str,
                 labelnames: Sequence[str] = ()) -> None:
        super().__init__(registry, name, help_text, labelnames, prometheus_client.Gauge)

    def set(self, value: float, *labels: str) -> None:
        self._series(labels).set(float(value))

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self._series(labels).inc(amount)


class Histogram(_Metric[prometheus_client.Histogram]):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str,
                 labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        super().__init__(registry, name, help_text, labelnames, prometheus_client.Histogram,
                         buckets=self.buckets)

    def observe(self, value: float, *labels: str) -> None:
        self._series(labels).observe(value)

    def count(self, *labels: str) -> int:
        """Observations of one series so far."""
        return int(self._sample(f"{self.name}_count", labels))


_M = TypeVar("_M", bound=_Metric[Any])


class Metrics:
    """The registry of one daemon: create each metric once, render all of them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._metrics: dict[str, _Metric[Any]] = {}
        self._lock = threading.Lock()

    def _register(self, kind: type[_M], name: str, labelnames: Sequence[str],
                  make: Callable[[], _M]) -> _M:
        """The metric registered as ``name``, made by ``make`` the first time."""
        if not _NAME_RE.match(name):
            raise ValueError(f"metric name {name!r} must match {_NAME_RE.pattern}")
        if kind is Counter and not name.endswith("_total"):
            raise ValueError(f"counter name {name!r} must end in _total")
        with self._lock:
            existing = self._metrics.get(name)
            if existing is None:
                made = self._metrics[name] = make()
                return made
            if not isinstance(existing, kind) or existing.labelnames != tuple(labelnames):
                raise ValueError(f"metric {name} already registered differently")
            return existing

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._register(Counter, name, labelnames,
                              lambda: Counter(self.registry, name, help_text, labelnames))

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._register(Gauge, name, labelnames,
                              lambda: Gauge(self.registry, name, help_text, labelnames))

    def histogram(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = DEFAULT_BUCKETS) -> Histogram:
        return self._register(Histogram, name, labelnames,
                              lambda: Histogram(self.registry, name, help_text, labelnames,
                                                buckets))

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4, :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry).decode("utf-8")
