"""OpenAI routes against create_app(FakeEngine): shapes, streaming, stop trimming, errors."""

from __future__ import annotations

import json

from router.settings import RouterSettings

MSG = [{"role": "user", "content": "hi"}]


def chunks(text: str) -> list:
    events = [e[len("data:") :].strip() for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_shape(client):
    r = client.post("/v1/chat/completions", json={"model": "tgi", "messages": MSG, "max_tokens": 5})
    assert r.status_code == 200
    b = r.json()
    assert (
        b["id"].startswith("chatcmpl-") and b["object"] == "chat.completion" and isinstance(b["created"], int)
    )
    assert b["model"] == "tgi"
    (c,) = b["choices"]
    assert c == {
        "index": 0,
        "message": {"role": "assistant", "content": " Hello world! This is"},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert (
        b["usage"]["completion_tokens"] == 5 and b["usage"]["total_tokens"] == b["usage"]["prompt_tokens"] + 5
    )
    r2 = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 1})
    assert r2.json()["id"] != b["id"]


def test_chat_finish_reasons_and_stop_stripped(client):
    b = client.post("/v1/chat/completions", json={"messages": MSG}).json()
    assert b["choices"][0]["finish_reason"] == "stop"  # eos_token -> stop
    b = client.post("/v1/chat/completions", json={"messages": MSG, "stop": "world"}).json()
    assert b["choices"][0]["finish_reason"] == "stop" and b["choices"][0]["message"]["content"] == " Hello "


def test_chat_params_map_to_engine(make_client):
    client, engine = make_client()
    r = client.post(
        "/v1/chat/completions",
        json={
            "messages": MSG,
            "temperature": 0,
            "top_p": 1.0,
            "max_completion_tokens": 3,
            "max_tokens": 9,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "logit_bias": {"42": 5, "7": -100},
            "seed": 11,
        },
    )
    assert r.status_code == 200, r.text
    p = engine.params[-1]
    assert p.is_greedy and p.max_new_tokens == 3 and p.top_p == 1.0
    assert (
        p.presence_penalty == 0.5
        and p.frequency_penalty == -0.5
        and dict(p.logit_bias) == {42: 5.0, 7: -100.0}
    )
    assert p.seed == 11


def test_chat_n_choices(make_client):
    client, engine = make_client()
    b = client.post("/v1/chat/completions", json={"messages": MSG, "n": 3, "max_tokens": 4}).json()
    assert [c["index"] for c in b["choices"]] == [0, 1, 2]
    seeds = [p.seed for p in engine.params[-3:]]
    assert len(set(seeds)) == 3
    assert len({c["message"]["content"] for c in b["choices"]}) > 1


def test_chat_logprobs_shape(client):
    b = client.post(
        "/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, "logprobs": True, "top_logprobs": 2}
    ).json()
    lp = b["choices"][0]["logprobs"]["content"]
    assert len(lp) == 2
    assert set(lp[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert lp[0]["bytes"] == list(lp[0]["token"].encode()) and len(lp[0]["top_logprobs"]) == 2


def test_chat_stream_with_usage(client):
    r = client.post(
        "/v1/chat/completions",
        json={"messages": MSG, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}},
    )
    cs = chunks(r.text)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == cs[0]["id"] for c in cs)
    assert cs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in cs if c["choices"]) == " Hello world!"
    assert cs[-2]["choices"][0]["finish_reason"] == "length"
    assert cs[-1]["choices"] == [] and cs[-1]["usage"]["completion_tokens"] == 3


def test_chat_stream_withholds_stop_prefix(client):
    r = client.post("/v1/chat/completions", json={"messages": MSG, "stream": True, "stop": ["world! This"]})
    cs = chunks(r.text)
    pieces = [
        c["choices"][0]["delta"].get("content")
        for c in cs
        if c["choices"] and c["choices"][0]["delta"].get("content")
    ]
    assert "".join(pieces) == " Hello "
    assert all("world" not in p for p in pieces)
    assert cs[-1]["choices"][0]["finish_reason"] == "stop"


def test_openai_errors(make_client):
    client, _ = make_client()
    r = client.post("/v1/chat/completions", json={"messages": MSG, "top_logprobs": 9, "logprobs": True})
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert (
        err["param"] == "top_logprobs" and "`top_logprobs` must be >= 0 and <= 5. Given: 9" in err["message"]
    )
    r = client.post("/v1/chat/completions", json={"messages": MSG, "logit_bias": {"abc": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    r = client.post(
        "/v1/chat/completions",
        json={"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]},
    )
    assert r.status_code == 400 and "not supported" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": MSG, "n": 0})
    assert r.status_code == 400
    r = client.post("/v1/chat/completions", json={"messages": "nope"})
    assert r.status_code in (400, 422) and "messages" in r.json()["error"]["message"]


def test_completions_shape_and_batch(client):
    b = client.post(
        "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2, "logprobs": 1, "temperature": 0}
    ).json()
    assert b["id"].startswith("cmpl-") and b["object"] == "text_completion"
    assert [c["index"] for c in b["choices"]] == [0, 1]
    lp = b["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"} and lp["text_offset"] == [
        0,
        6,
    ]
    assert b["choices"][0]["finish_reason"] == "length"
    b = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 1}).json()
    assert len(b["choices"]) == 1 and b["usage"]["prompt_tokens"] == 3


def test_completions_tgi_errors(client):
    r = client.post("/v1/completions", json={"prompt": ["a"] * 5})
    assert r.status_code == 422
    assert r.json()["error"]["message"] == "Number of prompts exceeds the maximum allowed batch size of 4"
    r = client.post("/v1/completions", json={"prompt": "a", "suffix": "b"})
    assert r.json()["error"]["code"] == "suffix not supported"


def test_completions_stream(client):
    r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 3, "stream": True, "stop": ["!"]})
    cs = chunks(r.text)
    assert all(c["object"] == "text_completion" for c in cs)
    assert "".join(c["choices"][0]["text"] for c in cs) == " Hello world"
    assert cs[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_tokenize(client):
    b = client.post("/chat_tokenize", json={"messages": MSG}).json()
    assert "<|im_start|>user\nhi<|im_end|>" in b["templated_text"] and b["tokenize_response"][0]["id"] >= 0


def test_total_token_limit_on_chat(make_client):
    client, _ = make_client(RouterSettings(), max_total_tokens=40, max_input_tokens=35)
    r = client.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 30})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith(
        "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 40."
    )
