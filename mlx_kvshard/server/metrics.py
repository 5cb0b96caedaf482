"""`GET /metrics`: Prometheus text from prometheus_client, on a registry of our own.

The HTTP layer counts what it sees per request (outcome, tokens, TTFT, TPOT, latency);
the engine's state (queue, batch, KV per rank, prefix cache, collectives and bytes per
step) is read from `Engine.metrics` at scrape time by a custom collector, the pattern
prometheus_client documents for values another component owns."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .state import Backend

P = "mlx_kvshard_"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServerMetrics:
    def __init__(self, backend: Backend):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(P + "requests", "HTTP generation requests by endpoint and outcome "
                                "(stop, length, cancelled, error, invalid, queue_full, unavailable)",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter(P + "cached_prompt_tokens", "Prompt tokens reused from the prefix cache",
                                     registry=r)
        self.generated_tokens = Counter(P + "generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Request received to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(P + "time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.latency = Histogram(P + "request_duration_seconds", "Request received to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        r.register(EngineCollector(backend))

    def finished(self, call, outcome: str, usage) -> None:
        """`call`: completions.Call, with the request's endpoint, times and token count."""
        self.requests.labels(call.endpoint, outcome).inc()
        if usage is not None:
            self.prompt_tokens.inc(usage.prompt_tokens)
            self.cached_tokens.inc(usage.cached_tokens)
            self.generated_tokens.inc(usage.completion_tokens)
        if call.t_first is not None:
            self.ttft.observe(call.t_first - call.t0)
            self.latency.observe(call.t_last - call.t0)
            if call.n_tokens > 1:
                self.tpot.observe((call.t_last - call.t_first) / (call.n_tokens - 1))

    def refused(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint, outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _gauge(name: str, doc: str, value: float, labels: dict | None = None) -> GaugeMetricFamily:
    g = GaugeMetricFamily(P + name, doc, labels=list(labels or {}))
    g.add_metric(list((labels or {}).values()), value)
    return g


def _per_rank(name: str, doc: str, values: list, kind=GaugeMetricFamily):
    m = kind(P + name, doc, labels=["rank"])
    for rank, v in enumerate(values):
        m.add_metric([str(rank)], v)
    return m


class EngineCollector(Collector):
    """The engine's own numbers, read when Prometheus scrapes."""

    def __init__(self, backend: Backend):
        self.backend = backend

    def collect(self):
        b = self.backend
        yield _gauge("ready", "1 when every rank has loaded and the group is up", float(b.ready))
        engine = b.engine
        if engine is None:
            return
        m = engine.metrics.snapshot(recent=1)
        yield _gauge("world_size", "Ranks in the group", engine.comm.world)
        yield _gauge("queue_depth", "Requests waiting for admission", m.get("queue_depth", 0))
        yield _gauge("running_requests", "Sequences in the decode batch", m.get("running", 0))
        yield _gauge("prefilling_requests", "Sequences being prefilled", m.get("prefilling", 0))
        used = m.get("kv_tokens_used", 0)
        yield _per_rank("kv_tokens_used", "KV positions held per rank (each for its own heads; sequence-sharded: "
                        "its share of each sequence's)", m.get("kv_positions_used_per_rank", [used] * engine.comm.world))
        yield _per_rank("kv_tokens_capacity", "KV tokens (of sequences) each rank measured it can hold",
                        [r["kv_tokens"] for r in engine.rank_capacity])
        yield _per_rank("kv_positions_capacity", "KV positions each rank measured it can hold (sequence-sharded: "
                        "a sequence's tokens need only its share of positions)",
                        [r.get("kv_positions", r["kv_tokens"]) for r in engine.rank_capacity])
        yield _per_rank("kv_bytes_used", "KV cache bytes per rank (its heads)",
                        m.get("kv_bytes_used_per_rank", [0] * engine.comm.world))
        yield _gauge("kv_tokens_admission_capacity", "KV tokens admission plans with (the smallest rank's, "
                     "or --max-kv-tokens)", engine.kv_capacity)
        yield _gauge("kv_tokens_reserved", "KV tokens reserved by admitted requests (prompt + max tokens)",
                     m.get("kv_tokens_reserved", 0))
        yield from self._prefix(m.get("prefix_cache"))
        yield from self._steps(m)
        if engine.audits:  # --check-sync: what every rank itself reported after the last join or removal
            reports = engine.audits[-1]["reports"]
            yield _per_rank("audited_kv_bytes", "KV bytes each rank reported at the last audit (--check-sync)",
                            [r["kv_bytes"] for r in reports])
            yield _per_rank("audited_batch_rows", "Batch rows each rank reported at the last audit (--check-sync)",
                            [len(r["rows"]) for r in reports])

    def _prefix(self, pc: dict | None):
        pc = pc or {"entries": 0, "bytes": 0, "hits": 0, "misses": 0, "evictions": 0}
        for key, doc in (("hits", "Prefix-cache lookups that reused KV"), ("misses", "Prefix-cache lookups that missed"),
                         ("evictions", "Prefix-cache blocks evicted")):
            c = CounterMetricFamily(P + f"prefix_cache_{key}", doc)
            c.add_metric([], pc[key])
            yield c
        yield _gauge("prefix_cache_entries", "Prefix-cache blocks held (--prefix-block-tokens tokens each, a tail shorter)",
                     pc["entries"])
        yield _gauge("prefix_cache_bytes", "Bytes the prefix cache holds on the largest rank", pc["bytes"])
        tiers = pc.get("tiers")
        if tiers is None:
            return
        for key, name, doc, kind in (
                ("blocks", "prefix_cache_tier_blocks", "Prefix-cache blocks held per tier (a block can be in both)",
                 GaugeMetricFamily),
                ("bytes", "prefix_cache_tier_bytes", "Prefix-cache bytes per tier on the largest rank", GaugeMetricFamily),
                ("hits", "prefix_cache_tier_hits", "Prefix-cache hits by the farthest tier they used", CounterMetricFamily),
                ("hit_tokens", "prefix_cache_tier_hit_tokens", "Prompt positions reused, by the tier that held them",
                 CounterMetricFamily),
                ("hit_bytes", "prefix_cache_tier_hit_bytes", "KV bytes reused (largest rank), by the tier that held them",
                 CounterMetricFamily),
                ("evictions", "prefix_cache_tier_evictions", "Blocks evicted per tier (from RAM: to disk when there)",
                 CounterMetricFamily)):
            m = kind(P + name, doc, labels=["tier"])
            for tier in ("ram", "disk"):
                m.add_metric([tier], tiers[key][tier])
            yield m
        yield _gauge("prefix_cache_disk_enabled", "1 while the disk tier is on (--prefix-cache-dir)",
                     float(pc["disk_on"]))
        c = CounterMetricFamily(P + "prefix_cache_disk_load_failures", "Disk blocks some rank could not read back "
                                "(missing, truncated or corrupt: recomputed)")
        c.add_metric([], pc["load_failures"])
        yield c
        io = pc.get("disk_io")
        if io is None:
            return
        for key, name, doc in (("read_bytes", "prefix_cache_disk_read_bytes", "Block bytes rank 0 read from its disk"),
                               ("read_s", "prefix_cache_disk_read_seconds", "Seconds rank 0 spent reading blocks"),
                               ("write_bytes", "prefix_cache_disk_write_bytes", "Block bytes rank 0 wrote to its disk"),
                               ("write_s", "prefix_cache_disk_write_seconds",
                                "Seconds rank 0's writer thread spent writing blocks"),
                               ("writes_dropped", "prefix_cache_disk_writes_dropped",
                                "Block writes rank 0 dropped because its disk lagged")):
            c = CounterMetricFamily(P + name, doc)
            c.add_metric([], io[key])
            yield c

    def _steps(self, m: dict):
        t = m.get("totals", {})
        for key, name, doc in (("steps", "engine_steps", "Engine steps run"),
                               ("decode_steps", "decode_steps", "Engine steps that decoded a batch"),
                               ("collectives", "collectives", "Collectives issued by rank 0 (every rank issues the same)"),
                               ("bytes", "collective_bytes", "Collective payload bytes per rank"),
                               ("verify_steps", "speculative_verify_steps", "Decode steps that verified proposals"),
                               ("drafted", "speculative_drafted_tokens", "Proposed tokens verified (--prompt-lookup)"),
                               ("accepted", "speculative_accepted_tokens", "Proposed tokens equal to the model's")):
            c = CounterMetricFamily(P + name, doc)
            c.add_metric([], t.get(key, 0))
            yield c
        last = (m.get("recent_steps") or [{}])[-1]
        yield _gauge("last_step_batch", "Rows decoded in the last step", last.get("batch", 0))
        yield _gauge("last_step_collectives", "Collectives in the last step", last.get("collectives", 0))
        yield _gauge("last_step_collective_bytes", "Collective payload bytes per rank in the last step",
                     last.get("bytes", 0))
        yield _gauge("last_step_seconds", "Wall time of the last step", last.get("wall_s", 0.0))
