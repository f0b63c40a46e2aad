"""Benchmarking a model the way TFLite's ``benchmark_model`` does, from Python.

Load time, first inference, then ``warmup`` unmeasured runs and ``runs``
measured ones on a fixed random input; latency percentiles, throughput and the
process's peak RSS.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .backends import Backend, BackendName
from .delegates import DelegateSettings
from .engine import Engine
from .modelfile import ModelBytes

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class BenchResult:
    """What one benchmark run measured; times in milliseconds."""

    model: str
    backend: str
    delegate: str
    threads: int | None
    runs: int
    warmup: int
    load_ms: float
    first_inference_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    inferences_per_s: float
    peak_rss_mb: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, floats rounded to microseconds."""
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def fill_random_inputs(engine: Engine, seed: int = 0) -> None:
    """Write reproducible random data of the right dtype into every input."""
    rng = np.random.default_rng(seed)
    for i, spec in enumerate(engine.inputs):
        dtype = np.dtype(spec.dtype)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            data = rng.integers(info.min, info.max, size=spec.shape, dtype=dtype, endpoint=True)
        else:
            data = rng.random(size=spec.shape).astype(dtype)
        engine.set_input(data, i)


def bench(
    model: ModelBytes,
    *,
    runs: int = 100,
    warmup: int = 10,
    threads: int | None = None,
    delegate: DelegateSettings | None = None,
    backend: Backend | BackendName | str | None = None,
) -> BenchResult:
    """Load ``model`` and time ``runs`` invokes after ``warmup`` unmeasured ones."""
    with Engine(model, delegate=delegate, threads=threads, backend=backend) as engine:
        fill_random_inputs(engine)
        first_ms = engine.invoke()
        for _ in range(warmup):
            engine.invoke()
        latencies = np.empty(runs, dtype=np.float64)
        started = time.perf_counter()
        for i in range(runs):
            latencies[i] = engine.invoke()
        wall_s = time.perf_counter() - started
        p50, p90, p99 = np.percentile(latencies, PERCENTILES)
        return BenchResult(
            model=model.source,
            backend=engine.backend.label,
            delegate=engine.delegate.description,
            threads=threads,
            runs=runs,
            warmup=warmup,
            load_ms=engine.load_ms,
            first_inference_ms=first_ms,
            min_ms=float(latencies.min()),
            p50_ms=float(p50),
            p90_ms=float(p90),
            p99_ms=float(p99),
            max_ms=float(latencies.max()),
            mean_ms=float(latencies.mean()),
            inferences_per_s=runs / wall_s,
            peak_rss_mb=peak_rss_mb(),
        )
