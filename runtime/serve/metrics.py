"""`Metrics`: the server's Prometheus metrics, through the official client (`prometheus_client`).

Each app has its own registry (several apps in one process, as in tests, never share counts):

- edgegpt_requests_total{endpoint, status}: answered requests by HTTP status.
- edgegpt_prompt_tokens_total{model}, edgegpt_generated_tokens_total{model}: tokens in and out.
- edgegpt_queue_depth{model}, edgegpt_busy_slots{model}: read from the schedulers at each scrape.
- edgegpt_time_to_first_token_seconds{model}: from queueing a job to its first token.
- edgegpt_time_per_output_token_seconds{model}: the gaps between a job's tokens.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edgegpt.runtime.serve.scheduler import Job, Scheduler

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters, gauges and histograms of one app; `registry` is what /metrics renders."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("edgegpt_requests", "Answered requests.", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("edgegpt_prompt_tokens", "Prompt tokens of finished jobs.", ["model"], registry=r)
        self.generated_tokens = Counter("edgegpt_generated_tokens", "Generated tokens.", ["model"], registry=r)
        self.queue_depth = Gauge("edgegpt_queue_depth", "Jobs waiting for a slot.", ["model"], registry=r)
        self.busy_slots = Gauge("edgegpt_busy_slots", "Slots running a job.", ["model"], registry=r)
        self.ttft = Histogram(
            "edgegpt_time_to_first_token_seconds",
            "Queueing to first token.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "edgegpt_time_per_output_token_seconds",
            "Time between a job's tokens.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def job_done(self, model: str, job: Job) -> None:
        self.prompt_tokens.labels(model).inc(len(job.prompt))
        self.generated_tokens.labels(model).inc(len(job.completion.tokens))
        if job.first_token_at is not None:
            self.ttft.labels(model).observe(job.first_token_at - job.submitted_at)
        per_token = self.per_token.labels(model)
        for before, after in zip(job.token_times, job.token_times[1:]):
            per_token.observe(after - before)

    def observe_schedulers(self, schedulers: dict[str, Scheduler]) -> None:
        for name, scheduler in schedulers.items():
            self.queue_depth.labels(name).set(scheduler.queue_depth)
            self.busy_slots.labels(name).set(scheduler.busy_slots)
