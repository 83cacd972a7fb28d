"""What GET /metrics exposes, in Prometheus' text format (written by hand: no prometheus_client needed)."""

from __future__ import annotations

import threading

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return [
            *out,
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.sum:g}",
            f"{name}_count {self.count}",
        ]


class Metrics:
    """What GET /metrics exposes (Prometheus text format). Written by the event loop (requests) and the
    worker thread (generation), so every update holds the lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (route, status) -> count
        self.errors: dict[str, int] = {}  # route -> responses with status >= 400
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.queue_wait = Histogram(WAIT_BUCKETS)  # seconds from admission to the start of its generate call
        self.generated_tokens = 0
        self.generate_seconds = 0.0
        self.last_tokens_per_second = 0.0
        self.pending = 0  # admitted requests not yet answered (waiting or generating)
        self.rejected = 0  # refused with 429 (queue full)
        self.cancelled = 0  # streams whose client left before the end

    def request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
            if status >= 400:
                self.errors[route] = self.errors.get(route, 0) + 1

    def generated(self, batch: int, waits: list[float], tokens: int, seconds: float) -> None:
        with self.lock:
            self.batch_size.observe(batch)
            for w in waits:
                self.queue_wait.observe(w)
            self.generated_tokens += tokens
            self.generate_seconds += seconds
            self.last_tokens_per_second = tokens / seconds if seconds > 0 else 0.0

    def text(self) -> str:
        def family(name, kind, help, lines):
            return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", *lines]

        with self.lock:
            out = [
                *family(
                    "vlbridge_requests_total",
                    "counter",
                    "HTTP requests answered, by route and status.",
                    [
                        f'vlbridge_requests_total{{route="{r}",status="{s}"}} {n}'
                        for (r, s), n in sorted(self.requests.items())
                    ],
                ),
                *family(
                    "vlbridge_errors_total",
                    "counter",
                    "HTTP responses with a 4xx or 5xx status, by route.",
                    [f'vlbridge_errors_total{{route="{r}"}} {n}' for r, n in sorted(self.errors.items())],
                ),
                *family(
                    "vlbridge_rejected_total",
                    "counter",
                    "Requests refused with 429 (--max-queue).",
                    [f"vlbridge_rejected_total {self.rejected}"],
                ),
                *family(
                    "vlbridge_cancelled_total",
                    "counter",
                    "Streams whose client left before the last event (their rows stop generating).",
                    [f"vlbridge_cancelled_total {self.cancelled}"],
                ),
                *family(
                    "vlbridge_pending_requests",
                    "gauge",
                    "Requests waiting or generating.",
                    [f"vlbridge_pending_requests {self.pending}"],
                ),
                *family(
                    "vlbridge_batch_size",
                    "histogram",
                    "Requests per generate call.",
                    self.batch_size.lines("vlbridge_batch_size"),
                ),
                *family(
                    "vlbridge_queue_wait_seconds",
                    "histogram",
                    "Time from admission to the start of the request's generate call.",
                    self.queue_wait.lines("vlbridge_queue_wait_seconds"),
                ),
                *family(
                    "vlbridge_generated_tokens_total",
                    "counter",
                    "New tokens generated.",
                    [f"vlbridge_generated_tokens_total {self.generated_tokens}"],
                ),
                *family(
                    "vlbridge_generate_seconds_total",
                    "counter",
                    "Time spent in generate calls (tokens/s over a window: rate of tokens / rate of this).",
                    [f"vlbridge_generate_seconds_total {self.generate_seconds:g}"],
                ),
                *family(
                    "vlbridge_tokens_per_second",
                    "gauge",
                    "New tokens per second of the last generate call (all its rows).",
                    [f"vlbridge_tokens_per_second {self.last_tokens_per_second:g}"],
                ),
            ]
        return "\n".join(out) + "\n"
