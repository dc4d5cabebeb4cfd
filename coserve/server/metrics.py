"""Prometheus metrics: coserve's own (prefix `coserve_`) and the gauges the Gateway API
Inference Extension reads from a model server (`vllm:*`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from coserve.engine.stats import RequestStats, StepStats

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    """Implements the engine's StatsListener; one registry per app."""

    def __init__(self, model_name: str, max_loras: int = 0):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name

        def hist(name: str, doc: str, buckets=LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.ttft = hist("coserve_time_to_first_token_seconds", "Time from arrival to the first output token")
        self.itl = hist("coserve_inter_token_latency_seconds", "Time between consecutive output tokens")
        self.e2e = hist("coserve_e2e_request_latency_seconds", "Time from arrival to the last output token")
        self.queue = hist("coserve_request_queue_time_seconds", "Time from arrival to first scheduled")
        self.prefill = hist("coserve_request_prefill_time_seconds", "Time from first scheduled to first token")
        self.decode = hist("coserve_request_decode_time_seconds", "Time from first token to finish")
        self.step_time = hist("coserve_step_time_seconds", "Wall time of one engine step")
        self.tokens_per_step = hist("coserve_tokens_per_step", "Tokens computed per engine step", TOKEN_BUCKETS)
        self.prompt_tokens = Counter("coserve_prompt_tokens", "Prompt tokens of finished requests", labels, registry=r)
        self.generation_tokens = Counter("coserve_generation_tokens", "Generated tokens", labels, registry=r)
        self.finished = Counter(
            "coserve_requests_finished", "Finished requests by reason", labels + ["finished_reason"], registry=r
        )
        self.preemptions = Counter("coserve_preemptions", "Sequences preempted for KV space", labels, registry=r)
        self.train_tokens = Counter("coserve_fine_tuning_tokens", "Fine-tuning tokens forwarded (co-served)",
                                    labels, registry=r)
        self.train_jobs = Gauge("coserve_fine_tuning_jobs", "Fine-tuning jobs in this replica's engine", labels,
                                registry=r)
        self.running = Gauge("coserve_num_requests_running", "Requests running in the engine", labels, registry=r)
        self.waiting = Gauge("coserve_num_requests_waiting", "Requests waiting to be scheduled", labels, registry=r)
        self.kv_usage = Gauge("coserve_kv_cache_usage_perc", "Fraction of KV-cache blocks in use", labels, registry=r)
        self.prefix_hit = Gauge("coserve_prefix_cache_hit_rate", "Prompt tokens served by the prefix cache",
                                labels, registry=r)
        # Gateway API Inference Extension names (as vLLM exposes them).
        self.gie_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting", labels, registry=r)
        self.gie_running = Gauge("vllm:num_requests_running", "Requests running", labels, registry=r)
        self.gie_kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage (0..1)", labels, registry=r)
        self.max_loras = max_loras
        self.adapter_load = Histogram("coserve_adapter_load_seconds", "Adapter load time by tier (store: bytes "
                                      "from Redis; host: source -> validated host copy, store fetch included; "
                                      "device: host -> slot)", ["tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.adapters_resident = Gauge("coserve_adapters_resident", "Adapters (revisions) held per tier",
                                       ["tier"], registry=r)
        self.lora_info = Gauge("vllm:lora_requests_info", "Running and waiting adapters (value: a timestamp)",
                               ["max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=r)
        for metric in (self.running, self.waiting, self.kv_usage, self.prefix_hit,
                       self.gie_waiting, self.gie_running, self.gie_kv):
            metric.labels(model_name).set(0)

    def on_step(self, s: StepStats) -> None:
        m = self.model_name
        self.train_tokens.labels(m).inc(s.num_train_tokens)
        self.train_jobs.labels(m).set(s.num_train_jobs)
        self.step_time.labels(m).observe(s.step_time_s)
        self.tokens_per_step.labels(m).observe(s.num_tokens)
        for v in s.time_to_first_token_s:
            self.ttft.labels(m).observe(v)
        for v in s.inter_token_latencies_s:
            self.itl.labels(m).observe(v)
        self.generation_tokens.labels(m).inc(s.num_generated_tokens)
        if s.num_preempted:
            self.preemptions.labels(m).inc(s.num_preempted)
        self.set_load(s.num_running, s.num_waiting, s.kv_usage)
        self.prefix_hit.labels(m).set(s.prefix_hit_rate)
        self.lora_info.clear()  # one current series, as the Gateway API Inference Extension reads it
        self.lora_info.labels(str(self.max_loras), ",".join(s.running_adapters),
                              ",".join(s.waiting_adapters)).set_to_current_time()

    def on_adapter_load(self, timing) -> None:
        self.adapter_load.labels(timing.tier).observe(timing.seconds)

    def set_load(self, running: int, waiting: int, kv_usage: float) -> None:
        m = self.model_name
        for gauge, value in ((self.running, running), (self.gie_running, running), (self.waiting, waiting),
                             (self.gie_waiting, waiting), (self.kv_usage, kv_usage), (self.gie_kv, kv_usage)):
            gauge.labels(m).set(value)

    def on_request_done(self, s: RequestStats) -> None:
        m = self.model_name
        self.finished.labels(m, s.finish_reason).inc()
        self.prompt_tokens.labels(m).inc(s.num_prompt_tokens)
        self.e2e.labels(m).observe(s.e2e_latency_s)
        self.queue.labels(m).observe(s.queue_time_s)
        if s.num_generated_tokens:
            self.prefill.labels(m).observe(s.prefill_time_s)
            self.decode.labels(m).observe(s.decode_time_s)

    def set_resident(self, host: int, device: int) -> None:
        self.adapters_resident.labels("host").set(host)
        self.adapters_resident.labels("device").set(device)

    def render(self) -> bytes:
        return generate_latest(self.registry)
