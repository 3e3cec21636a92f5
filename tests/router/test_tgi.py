"""TGI-native API against create_app(FakeEngine): section 1.2 rules, response shapes, SSE format."""

from __future__ import annotations

import json

import pytest

from router.settings import RouterSettings


def sse_events(text: str) -> list[dict]:
    assert text.endswith("\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data:{") for e in events), events  # TGI: no space after "data:"
    return [json.loads(e[len("data:") :]) for e in events]


def test_generate_shape_and_headers(client):
    r = client.post(
        "/generate", json={"inputs": "Hi there", "parameters": {"max_new_tokens": 5, "details": True}}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["generated_text"] == " Hello world! This is"
    d = body["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 5 and d["seed"] is None
    assert d["prefill"] == [] and "top_tokens" not in d and "best_of_sequences" not in d
    assert set(d["tokens"][0]) == {"id", "text", "logprob", "special"}
    for h in (
        "x-compute-type",
        "x-compute-time",
        "x-total-time",
        "x-validation-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
        "x-prompt-tokens",
        "x-generated-tokens",
    ):
        assert h in r.headers, h
    assert r.headers["x-generated-tokens"] == "5" and r.headers["x-prompt-tokens"] == "2"


def test_absent_parameters_means_sampling_and_no_details(make_client):
    client, engine = make_client()
    r = client.post("/generate", json={"inputs": "Hi"})
    assert r.status_code == 200 and "details" not in r.json()
    p = engine.params[-1]
    assert p.temperature == 1.0 and p.seed is not None
    client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert engine.params[-1].temperature == 0.0  # present parameters: do_sample defaults to false


def test_top_tokens_prefill_and_seed(client):
    r = client.post(
        "/generate",
        json={
            "inputs": "Hi there",
            "parameters": {
                "max_new_tokens": 3,
                "details": True,
                "decoder_input_details": True,
                "top_n_tokens": 2,
                "do_sample": True,
                "seed": 7,
            },
        },
    )
    d = r.json()["details"]
    assert d["seed"] == 7
    assert d["prefill"][0]["logprob"] is None and isinstance(d["prefill"][1]["logprob"], float)
    assert len(d["top_tokens"]) == 3 and len(d["top_tokens"][0]) == 2


S = RouterSettings()
RULES = [
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"temperature": 0.0}, "`temperature` must be strictly positive"),
    ({"temperature": -1}, "`temperature` must be strictly positive"),
    ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"top_k": -3}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
    ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"truncate": 201}, "`truncate` must be strictly positive and less than 200. Given: 201"),
    ({"truncate": 0}, "`truncate` must be strictly positive and less than 200. Given: 0"),
    (
        {"max_new_tokens": 255},
        "`inputs` tokens + `max_new_tokens` must be <= 256. Given: 2 `inputs` tokens and 255 `max_new_tokens`",
    ),
    ({"grammar": {"type": "regex", "value": "a+"}}, "grammar is not supported"),
    ({"watermark": True}, "`watermark` is not supported by this server"),
    ({"adapter_id": "lora"}, "`adapter_id` is not supported: this server serves only its base model"),
]


@pytest.mark.parametrize(("params", "message"), RULES)
def test_validation_rules(client, params, message):
    r = client.post("/generate", json={"inputs": "Hi there", "parameters": params})
    assert r.status_code == 422, r.text
    assert r.json() == {"error": f"Input validation error: {message}", "error_type": "validation"}


def test_best_of_disabled_and_empty_and_long_inputs(make_client):
    client, _ = make_client(RouterSettings(max_best_of=1))
    r = client.post("/generate", json={"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}})
    assert r.json()["error"] == "Input validation error: `best_of` != 1 is not allowed for this endpoint"
    r = client.post("/generate", json={"inputs": "", "parameters": {}})
    assert r.json()["error"] == "Input validation error: `inputs` cannot be empty"
    r = client.post("/generate", json={"inputs": "a " * 210, "parameters": {"max_new_tokens": 1}})
    assert r.status_code == 422
    assert r.json()["error"].startswith(
        "Input validation error: `inputs` must have less than 200 tokens. Given: "
    )


def test_stream_only_rules(client):
    r = client.post("/generate_stream", json={"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}})
    assert r.status_code == 422 and r.json()["error"].endswith(
        "`best_of` != 1 is not supported when streaming tokens"
    )
    r = client.post("/generate_stream", json={"inputs": "x", "parameters": {"decoder_input_details": True}})
    assert r.json()["error"].endswith(
        "`decoder_input_details` == true is not supported when streaming tokens"
    )


def test_negative_unsigned_is_deserialize_error(client):
    r = client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": -1}})
    assert r.status_code == 422 and "parameters.max_new_tokens" in r.json()["error"]


def test_truncate_keeps_last_tokens(make_client, hf_tokenizer):
    client, engine = make_client()
    text = "one two three four five six"
    client.post("/generate", json={"inputs": text, "parameters": {"truncate": 3, "max_new_tokens": 1}})
    assert engine.params  # the request ran
    ids = hf_tokenizer.encode(text, add_special_tokens=True)
    r = client.post(
        "/generate",
        json={"inputs": text, "parameters": {"truncate": 3, "max_new_tokens": 1, "details": True}},
    )
    assert r.headers["x-prompt-tokens"] == "3" and len(ids) > 3


def test_stop_sequence_is_kept(client):
    r = client.post("/generate", json={"inputs": "x", "parameters": {"stop": ["world"], "details": True}})
    body = r.json()
    assert body["generated_text"] == " Hello world" and body["details"]["finish_reason"] == "stop_sequence"


def test_eos_finish(client):
    r = client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 50, "details": True}})
    assert r.json()["details"]["finish_reason"] == "eos_token"


def test_best_of_picks_best_and_lists_others(make_client):
    client, engine = make_client()
    r = client.post(
        "/generate",
        json={
            "inputs": "x",
            "parameters": {"best_of": 2, "do_sample": True, "max_new_tokens": 4, "details": True},
        },
    )
    d = r.json()["details"]
    assert len(d["best_of_sequences"]) == 1
    seeds = [p.seed for p in engine.params[-2:]]
    assert len(set(seeds)) == 2 and d["seed"] in seeds


def test_generate_stream_sse(client):
    r = client.post(
        "/generate_stream",
        json={"inputs": "Hi", "parameters": {"max_new_tokens": 3, "details": True, "top_n_tokens": 1}},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in r.text
    events = sse_events(r.text)
    assert [e["index"] for e in events] == [1, 2, 3]
    assert list(events[0]) == ["index", "token", "top_tokens", "generated_text", "details"]
    assert events[0]["generated_text"] is None and events[0]["details"] is None
    assert events[-1]["generated_text"] == " Hello world!"
    assert events[-1]["details"] == {
        "finish_reason": "length",
        "generated_tokens": 3,
        "seed": None,
        "input_length": 1,
    }


def test_compat_route(client):
    r = client.post("/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200 and r.json() == [{"generated_text": "Hi Hello world"}]  # full text by default
    r = client.post(
        "/",
        json={"inputs": "Hi", "parameters": {"max_new_tokens": 2, "return_full_text": False}, "stream": True},
    )
    assert sse_events(r.text)[-1]["generated_text"] == " Hello world"


def test_tokenize_byte_offsets(client):
    r = client.post("/tokenize", json={"inputs": "héllo world"})
    toks = r.json()
    assert toks[-1]["stop"] == len("héllo world".encode())
    assert all(set(t) == {"id", "text", "start", "stop"} for t in toks)


def test_info_health_models(make_client):
    client, engine = make_client()
    info = client.get("/info").json()
    assert info["model_id"] == "fake/smollm2-135m" and info["router"] == "text-generation-router"
    assert info["max_input_tokens"] == 200 and info["max_client_batch_size"] == 4
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    models = client.get("/v1/models").json()
    assert models == {
        "object": "list",
        "data": [
            {"id": "fake/smollm2-135m", "object": "model", "created": 0, "owned_by": "fake/smollm2-135m"}
        ],
    }
    engine.healthy = False
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"error": "unhealthy", "error_type": "healthcheck"}


def test_engine_errors(make_client):
    client, engine = make_client()
    engine.fail_with = ValueError("prompt too odd")
    r = client.post("/generate", json={"inputs": "x", "parameters": {}})
    assert r.status_code == 422 and r.json()["error"] == "Input validation error: prompt too odd"
    engine.fail_with = RuntimeError("engine is gone")
    r = client.post("/generate", json={"inputs": "x", "parameters": {}})
    assert r.status_code == 424
    assert r.json() == {
        "error": "Request failed during generation: engine is gone",
        "error_type": "generation",
    }
    # errors before the first token are an HTTP status even when streaming
    engine.fail_with = RuntimeError("engine is gone")
    r = client.post("/generate_stream", json={"inputs": "x", "parameters": {}})
    assert r.status_code == 424 and r.json()["error_type"] == "generation"
    engine.fail_with = ValueError("bad")
    r = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    assert r.status_code == 400 and r.json()["error"]["message"] == "Input validation error: bad"


def test_mid_stream_errors(make_client):
    client, engine = make_client()
    engine.fail_after = 2
    r = client.post("/generate_stream", json={"inputs": "x", "parameters": {"max_new_tokens": 10}})
    events = sse_events(r.text)
    assert [e.get("index") for e in events[:2]] == [1, 2]
    assert events[-1] == {
        "error": "Request failed during generation: engine died mid-request",
        "error_type": "generation",
    }
    engine.fail_after = 2
    r = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    last = json.loads(r.text.strip().split("\n\n")[-1][len("data:") :])
    assert last["error"]["code"] == "generation" and "engine died" in last["error"]["message"]
    assert "[DONE]" not in r.text
    assert 'tgi_request_failure{err="generation"} 2.0' in client.get("/metrics").text
