"""Metrics (TGI names + tgx additions) and OTel tracing under a client traceparent."""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from router.settings import RouterSettings

TGI_NAMES = [
    "tgi_request_count",
    "tgi_request_success",
    "tgi_request_failure",
    "tgi_request_duration_bucket",
    "tgi_request_validation_duration_bucket",
    "tgi_request_queue_duration_bucket",
    "tgi_request_inference_duration_bucket",
    "tgi_request_mean_time_per_token_duration_bucket",
    "tgi_request_input_length_bucket",
    "tgi_request_generated_tokens_bucket",
    "tgi_request_max_new_tokens_bucket",
    "tgi_batch_current_size",
    "tgi_batch_current_max_tokens",
    "tgi_batch_max_total_tokens",
    "tgi_queue_size",
    "tgi_request_time_to_first_token_bucket",
    "tgi_request_inter_token_latency_bucket",
    "tgx_kv_cache_usage",
    "tgx_compiled_programs_total",
]


def test_metrics_names_and_values(client):
    client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 3}})
    client.post("/generate", json={"inputs": "x", "parameters": {"top_k": 0}})
    text = client.get("/metrics").text
    for name in TGI_NAMES:
        assert f"\n{name}" in text, name
    assert "\ntgi_request_count 2.0" in text and "\ntgi_request_success 1.0" in text
    assert 'tgi_request_failure{err="validation"} 1.0' in text
    assert "tgi_request_generated_tokens_sum 3.0" in text
    assert "tgx_kv_cache_usage 0.25" in text and "tgx_compiled_programs_total 3.0" in text
    assert "tgi_batch_max_total_tokens 4096.0" in text
    assert "tgi_request_inter_token_latency_count 2.0" in text  # 3 tokens -> 2 gaps


def test_apps_have_separate_registries(make_client):
    a, _ = make_client()
    b, _ = make_client()
    a.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1}})
    assert "\ntgi_request_count 1.0" in a.get("/metrics").text
    assert "\ntgi_request_count 0.0" in b.get("/metrics").text


def test_trace_spans_under_client_traceparent(make_client):
    exporter = InMemorySpanExporter()
    client, _ = make_client(RouterSettings(), span_exporter=exporter)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    r = client.post(
        "/generate",
        json={"inputs": "x", "parameters": {"max_new_tokens": 4}},
        headers={"traceparent": f"00-{trace_id}-{parent}-01"},
    )
    assert r.status_code == 200
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) >= {"generate", "validation", "queue", "prefill", "decode"}
    root = spans["generate"]
    assert format(root.context.trace_id, "032x") == trace_id and format(root.parent.span_id, "016x") == parent
    for name in ("validation", "queue", "prefill", "decode"):
        s = spans[name]
        assert s.parent.span_id == root.context.span_id and s.start_time <= s.end_time
    assert spans["validation"].end_time <= spans["queue"].start_time <= spans["prefill"].start_time
    assert spans["prefill"].end_time == spans["decode"].start_time
    assert root.attributes["tgx.generated_tokens"] == 4


def test_trace_records_errors(make_client):
    exporter = InMemorySpanExporter()
    client, _ = make_client(RouterSettings(), span_exporter=exporter)
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "top_p": 0})
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "chat_completions"]
    assert not span.status.is_ok
