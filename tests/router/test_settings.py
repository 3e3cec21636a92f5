"""RouterSettings CLI: TGI launcher flag names, UPPER_SNAKE env fallbacks, defaults."""

from __future__ import annotations

import dataclasses

import pytest

from router.settings import RouterSettings, parse_args


def test_defaults():
    s = parse_args([], env={})
    assert s == RouterSettings()
    assert (s.port, s.max_concurrent_requests, s.max_stop_sequences, s.max_best_of) == (3000, 128, 4, 2)
    assert (s.max_client_batch_size, s.payload_limit, s.max_top_n_tokens) == (4, 2_000_000, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]


def test_flags_and_env():
    s = parse_args(
        [
            "--socket",
            "/tmp/e.sock",
            "--hostname",
            "127.0.0.1",
            "--port",
            "8080",
            "--max-concurrent-requests",
            "7",
            "--cors-allow-origin",
            "https://a",
            "--cors-allow-origin",
            "https://b",
            "--api-key",
            "k",
            "--json-output",
        ],
        env={"MAX_BEST_OF": "3", "PORT": "9999", "OTLP_ENDPOINT": "http://otel:4317", "PAYLOAD_LIMIT": "10"},
    )
    assert (s.socket_path, s.hostname, s.port, s.max_concurrent_requests) == (
        "/tmp/e.sock",
        "127.0.0.1",
        8080,
        7,
    )
    assert s.cors_allow_origin == ("https://a", "https://b") and s.api_key == "k" and s.json_output
    assert (s.max_best_of, s.otlp_endpoint, s.payload_limit) == (
        3,
        "http://otel:4317",
        10,
    )  # env fills the rest
    assert parse_args([], env={"CORS_ALLOW_ORIGIN": "https://x,https://y"}).cors_allow_origin == (
        "https://x",
        "https://y",
    )


def test_short_port_flag():
    assert parse_args(["-p", "8081"], env={}).port == 8081


def test_invalid_settings():
    with pytest.raises(ValueError):
        RouterSettings(max_concurrent_requests=0)
