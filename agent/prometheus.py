"""The optional Prometheus endpoint: the health message's figures as metrics.

The ``prometheus`` thread, a supervised part (``agent/supervisor.py``),
serves ``/metrics`` one request at a time; each scrape calls
``HealthCollector.collect`` there, which builds a fresh health
snapshot (the same one the ``health`` topic publishes), so the two never
disagree and nothing is computed between scrapes. Within the snapshot each
stream's counters are read downstream first (a frame is counted captured
before inference can take it), so no scrape shows processed above captured.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from edgefleet.runtime import EnvironmentProblem

from .protocol import HealthMessage
from .supervisor import SUPERVISOR, fault_point

_REQUEST_WAIT_S = 0.5  # how often the serving loop looks at its stop event

_STREAM_COUNTERS = {
    "captured": "Frames read from the source.",
    "processed": "Frames that went through inference.",
    "skipped": "Frames replaced by a newer one before inference.",
    "failed": "Frames whose inference failed.",
    "events": "Events stored in the outbox.",
    "events_lost": "Events that could not be stored.",
    "source_failures": "Source outages.",
}


class HealthCollector(Collector):
    """Turns the current ``HealthMessage`` into Prometheus metrics at scrape time."""

    def __init__(self, health: Callable[[], HealthMessage]) -> None:
        self._health = health

    def collect(self) -> Iterator[Metric]:
        """One sample per stream and figure, plus the outbox, the broker link and the board."""
        h = self._health()
        for name, text in _STREAM_COUNTERS.items():
            family = CounterMetricFamily(f"edgefleet_stream_{name}", text, labels=["stream"])
            for stream, sh in h.streams.items():
                family.add_metric([stream], getattr(sh, name))
            yield family
        fps = GaugeMetricFamily("edgefleet_stream_fps", "Processed frames/s.", labels=["stream"])
        latency = GaugeMetricFamily(
            "edgefleet_stream_latency_ms", "Capture to result.", labels=["stream", "quantile"]
        )
        running = GaugeMetricFamily(
            "edgefleet_stream_running", "1 when the source delivers frames.", labels=["stream"]
        )
        interval = GaugeMetricFamily(
            "edgefleet_stream_frame_interval_seconds",
            "Median time between inferred frames.",
            labels=["stream"],
        )
        for stream, sh in h.streams.items():
            fps.add_metric([stream], sh.fps)
            if sh.frame_interval_s is not None:
                interval.add_metric([stream], sh.frame_interval_s)
            running.add_metric([stream], 1.0 if sh.state == "running" else 0.0)
            for quantile, value in (("0.5", sh.latency_p50_ms), ("0.99", sh.latency_p99_ms)):
                if value is not None:
                    latency.add_metric([stream, quantile], value)
        yield from (fps, latency, running, interval)
        yield GaugeMetricFamily("edgefleet_outbox_depth", "Events waiting.", value=h.outbox.depth)
        yield CounterMetricFamily(
            "edgefleet_outbox_dropped", "Events dropped by the bound.", value=h.outbox.dropped
        )
        yield GaugeMetricFamily(
            "edgefleet_mqtt_connected", "1 when connected.", value=float(h.mqtt.connected)
        )
        yield CounterMetricFamily(
            "edgefleet_mqtt_reconnects", "Reconnections.", value=h.mqtt.reconnects
        )
        yield CounterMetricFamily(
            "edgefleet_mqtt_id_conflicts",
            "Connections lost to another client with this client id.",
            value=h.mqtt.id_conflicts,
        )
        yield GaugeMetricFamily("edgefleet_cpu_percent", "Agent CPU.", value=h.system.cpu_percent)
        yield GaugeMetricFamily("edgefleet_rss_mb", "Agent memory, MiB.", value=h.system.rss_mb)
        if h.system.cpu_temperature_c is not None:
            yield GaugeMetricFamily(
                "edgefleet_cpu_temperature_c", "CPU temperature.", value=h.system.cpu_temperature_c
            )


def serve(health: Callable[[], HealthMessage], *, port: int, bind: str) -> Callable[[], None]:
    """Serve ``/metrics`` on ``bind:port``; returns the function that stops serving."""
    registry = CollectorRegistry()
    registry.register(HealthCollector(health))
    try:
        family = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("_Server", (WSGIServer,), {"address_family": family})
        server: WSGIServer = make_server(
            bind, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise EnvironmentProblem(
            f"health.prometheus_port: cannot listen on {bind}:{port} ({exc.strerror})",
            hint="choose a free port or unset health.prometheus_port",
        ) from exc
    server.timeout = _REQUEST_WAIT_S
    stop = threading.Event()

    def run() -> None:  # prometheus thread
        while not stop.is_set():
            fault_point()
            server.handle_request()

    thread = SUPERVISOR.start("prometheus", run, stop)

    def stop_serving() -> None:
        stop.set()
        thread.join(_REQUEST_WAIT_S * 4)
        server.server_close()

    return stop_serving


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape."""

    def log_message(self, format: str, *args: object) -> None:
        """Drop the line."""
