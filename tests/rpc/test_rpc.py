"""The engine server as a real subprocess, driven through RemoteEngine: the process boundary's contract.

Owns: checks that outputs cross the socket unchanged (vs an in-process LLMEngine), batched per step,
that leaving an iteration frees the engine's pages, that validation errors and a dead engine reach the
caller as ValueError / EngineUnavailableError. Must not: depend on the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.rpc import JAX_CACHE, REPO, FakeEngine, build_tiny_llama, start_server, stop, wait_for_socket

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


def _socket_path() -> str:
    return os.path.join(
        tempfile.mkdtemp(prefix="tgx-test-"), "engine.sock"
    )  # short: Unix sockets cap paths at ~107 bytes


@pytest.fixture(scope="module")
def _servers(tiny_model, tmp_path_factory):
    """{"shared": the engine server this module's tests share, "doomed": the one
    test_engine_death_fails_in_flight_requests kills}, as (process, socket path). Started together:
    their start-ups overlap, which on 2 cores costs about as much as one."""
    started = {}
    try:
        for name in ("shared", "doomed"):
            sock, log = _socket_path(), tmp_path_factory.mktemp(name) / "server.log"
            started[name] = (start_server(tiny_model, sock, log), sock, log)
        for proc, sock, log in started.values():
            wait_for_socket(proc, sock, log)
        yield {name: (proc, sock) for name, (proc, sock, _) in started.items()}
    finally:
        for proc, _, _ in started.values():
            stop(proc)


@pytest.fixture(scope="module")
def server(_servers):
    return _servers["shared"][1]


@contextlib.asynccontextmanager
async def remote(sock: str, **kw):
    from engine.rpc.client import RemoteEngine

    engine = await RemoteEngine.connect(sock, timeout=30, **kw)
    try:
        yield engine
    finally:
        await engine.close()


async def collect(engine, prompt, params, request_id=None):
    return [o async for o in engine.generate(prompt, params, request_id)]


async def wait_idle(engine, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        stats = await engine.stats()
        if (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (
            0,
            0,
            0.0,
        ) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.05)


def test_codec_round_trips():
    from engine.api import GeneratedToken, RequestOutput, TokenLogprob
    from engine.rpc import codec
    from engine.sampling_params import SamplingParams

    p = SamplingParams(
        max_new_tokens=7, temperature=0.5, top_k=3, top_p=0.9, typical_p=0.8, repetition_penalty=1.2,
        frequency_penalty=0.5, presence_penalty=-0.5, seed=2**63 - 1, stop=("a", "bc"), stop_token_ids=(5,),
        ignore_eos=True, top_n_tokens=2, skip_special_tokens=False, prompt_logprobs=True, logit_bias=((3, -1.5),),
    )  # fmt: skip
    assert codec.params_from_pb(codec.params_to_pb(p)) == p
    assert codec.params_from_pb(codec.params_to_pb(SamplingParams())) == SamplingParams()
    tok = GeneratedToken(9, "x", -0.25, False, (TokenLogprob(9, "x", -0.25), TokenLogprob(1, "y", -3.0)))
    out = RequestOutput("r", (tok,), "x", True, "stop_sequence", 4, 1, seed=3, stop_sequence="x",
                        prompt_tokens=(TokenLogprob(1, "<s>", math.nan),))  # fmt: skip
    back = codec.output_from_pb(codec.output_to_pb(out))
    assert math.isnan(back.prompt_tokens[0].logprob)
    assert back == out.__class__(**{**out.__dict__, "prompt_tokens": back.prompt_tokens})
    plain = RequestOutput("r", (), "", False, None, 4, 0)
    assert codec.output_from_pb(codec.output_to_pb(plain)) == plain
    with pytest.raises(ValueError, match="non-negative"):
        codec.submit_request("r", [1, -2], p)


def test_client_does_not_import_jax():
    code = (
        "import sys, engine.rpc.client, engine.launcher\n"
        "leaked = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib', 'torch')))\n"
        "assert not leaked, leaked[:5]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.asyncio
async def test_info_health_and_tokenize(server):
    from transformers import AutoTokenizer

    async with remote(server) as engine:
        info = engine.info
        assert (info.max_batch_size, info.max_total_tokens, info.max_batch_prefill_tokens) == (16, 256, 128)
        assert info.max_top_n_tokens == 3 and info.vocab_size == 49152 and info.model_dtype == "float32"
        tok = AutoTokenizer.from_pretrained(info.tokenizer_dir)
        assert info.eos_token_ids == (tok.eos_token_id,)
        assert await engine.tokenize("Hello world") == tok("Hello world")["input_ids"]
        health = await engine.health()
        assert health and health.healthy


@pytest.fixture(scope="module")
def in_process_engine(tiny_model):
    import jax

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    JAX_CACHE.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(JAX_CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cfg = EngineConfig(  # the server's (SERVER_FLAGS)
        model_id=str(tiny_model), dtype="float32", max_batch_size=16, max_total_tokens=256,
        max_batch_prefill_tokens=128, max_batch_total_tokens=4096, max_top_n_tokens=3,
    )  # fmt: skip
    return LLMEngine(cfg)


@pytest.mark.asyncio
async def test_stream_equals_in_process_engine(server, in_process_engine):
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=12, top_n_tokens=2, ignore_eos=True)
    prompt = "The capital of France is"
    in_process_engine.add_request(prompt, params, request_id="local")
    local = []
    in_process_engine.run_until_done(local.append)
    async with remote(server) as engine:
        streamed = await collect(engine, prompt, params)
    assert [t.token_id for o in streamed for t in o.tokens] == [t.token_id for o in local for t in o.tokens]
    assert [[x.token_id for x in t.top] for o in streamed for t in o.tokens] == [
        [x.token_id for x in t.top] for o in local for t in o.tokens
    ]
    assert [t.logprob for o in streamed for t in o.tokens] == pytest.approx(
        [t.logprob for o in local for t in o.tokens], rel=1e-6
    )
    assert "".join(o.text for o in streamed) == "".join(o.text for o in local)
    assert streamed[-1].finished and streamed[-1].finish_reason == "length"
    assert (
        streamed[-1].num_generated_tokens == 12
        and streamed[-1].num_prompt_tokens == local[-1].num_prompt_tokens
    )


@pytest.mark.asyncio
async def test_concurrent_requests_share_step_messages(server):
    from engine.rpc import engine_pb2 as pb
    from engine.sampling_params import SamplingParams

    async with remote(server) as engine:
        # A second, raw subscriber sees exactly what crosses the socket: one message per engine step.
        raw = engine._stub.Events(pb.EventsRequest())
        await raw.read()  # the "subscribed" message
        lengths = [5 + i for i in range(20)]  # 20 requests > max_batch_size 16: some wait their turn
        results = await asyncio.gather(
            *(
                collect(engine, [1, 2, 3 + i], SamplingParams(max_new_tokens=n, ignore_eos=True))
                for i, n in enumerate(lengths)
            )
        )
        for outs, n in zip(results, lengths):
            assert sum(len(o.tokens) for o in outs) == n
            assert outs[-1].num_generated_tokens == n and outs[-1].finish_reason == "length"
            assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        per_message, finished = [], 0
        while finished < len(lengths):
            event = await asyncio.wait_for(raw.read(), 10)
            per_message.append(len({o.request_id for o in event.outputs}))
            assert len(event.outputs) == per_message[-1]  # never two outputs of one request in a message
            assert event.stats.batch_size == len(event.outputs)
            finished += sum(o.finished for o in event.outputs)
        raw.cancel()
        assert max(per_message) >= 2, per_message
        assert sum(per_message) == sum(lengths)


@pytest.mark.asyncio
async def test_leaving_the_iteration_frees_pages(server):
    from engine.sampling_params import SamplingParams

    async with remote(server) as engine:
        params = SamplingParams(max_new_tokens=120, ignore_eos=True)
        async with contextlib.aclosing(engine.generate("a long story", params)) as stream:
            async for out in stream:
                if out.num_generated_tokens >= 2:
                    break
        stats = await wait_idle(engine)
        assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
        # abort() by id ends a listener's stream with "cancelled".
        seen = []

        async def listen():
            async for out in engine.generate("another story", params, request_id="to-abort"):
                seen.append(out)
                if len(seen) == 1:
                    await engine.abort("to-abort")

        await asyncio.wait_for(listen(), 20)
        assert (
            seen[-1].finished
            and seen[-1].finish_reason == "cancelled"
            and seen[-1].num_generated_tokens < 120
        )
        stats = await wait_idle(engine)
        assert stats.kv_cache_usage == 0.0


@pytest.mark.asyncio
async def test_validation_errors_are_value_errors(server):
    from engine.sampling_params import SamplingParams

    async with remote(server) as engine:
        with pytest.raises(ValueError, match=r"`inputs` tokens \+ `max_new_tokens` must be <= 256"):
            await collect(engine, "hi", SamplingParams(max_new_tokens=500))
        with pytest.raises(ValueError, match=r"`top_n_tokens` must be >= 0 and <= 3"):
            await collect(engine, "hi", SamplingParams(max_new_tokens=2, top_n_tokens=4))
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 49152\)"):
            await collect(engine, [1, 10**6], SamplingParams(max_new_tokens=2))
        with pytest.raises(ValueError, match="cannot be empty"):
            await collect(engine, [], SamplingParams(max_new_tokens=2))
        # The engine is unharmed and the ids are free again.
        assert len(await collect(engine, "hi", SamplingParams(max_new_tokens=2))) == 2
        assert (await wait_idle(engine)).num_running == 0


@pytest.mark.asyncio
async def test_engine_death_fails_in_flight_requests(_servers):
    from engine.rpc.client import EngineUnavailableError
    from engine.sampling_params import SamplingParams

    proc, sock = _servers["doomed"]
    try:
        async with remote(sock) as engine:
            params = SamplingParams(max_new_tokens=118, ignore_eos=True)
            first = asyncio.Event()

            async def run(i):
                async for _ in engine.generate(f"story {i}", params):
                    first.set()

            tasks = [asyncio.create_task(run(i)) for i in range(3)]
            await asyncio.wait_for(first.wait(), 30)
            os.kill(proc.pid, signal.SIGKILL)
            start = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
            assert all(isinstance(r, EngineUnavailableError) for r in results), results
            health = await engine.health()
            assert not health and time.monotonic() - start < 10
            with pytest.raises(EngineUnavailableError):
                await collect(engine, "hi", SamplingParams(max_new_tokens=2))
    finally:
        stop(proc)


class _FailingEngine(FakeEngine):
    """One token per step (running: tokens so far), then a crash on step `crash_at`."""

    def __init__(self, crash_at: int) -> None:
        super().__init__()
        self.crash_at, self.steps = crash_at, 0

    def add_request(self, ids, params, request_id):
        self.running[request_id] = 0

    def step(self):
        from engine.api import GeneratedToken, RequestOutput

        self.steps += 1
        if self.steps == self.crash_at:
            raise RuntimeError("device fell over")
        time.sleep(0.01)
        for rid in self.running:
            self.running[rid] += 1
        return [
            RequestOutput(rid, (GeneratedToken(3, "x", 0.0, False),), "x", False, None, 2, n)
            for rid, n in self.running.items()
        ]


@pytest.mark.asyncio
async def test_engine_loop_failure_ends_requests_and_the_server():
    import grpc

    from engine.rpc import codec
    from engine.rpc import engine_pb2_grpc as pb_grpc
    from engine.rpc.client import EngineUnavailableError
    from engine.rpc.server import serve
    from engine.sampling_params import SamplingParams

    sock = _socket_path()
    server = asyncio.create_task(serve(_FailingEngine(crash_at=5), sock, stop=asyncio.Event()))
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        submit = pb_grpc.EngineStub(channel).Submit(
            codec.submit_request("early", "hi", SamplingParams()), wait_for_ready=True, timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:  # nobody subscribed yet: refused, not run blind
            await submit
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    async with remote(sock) as engine:
        seen = []
        with pytest.raises(EngineUnavailableError, match="device fell over"):
            async for out in engine.generate("hi", SamplingParams(max_new_tokens=50)):
                seen.append(out)
        assert len(seen) == 4
        assert await asyncio.wait_for(server, 10) == 1  # the process exits non-zero: the launcher sees it
        assert not await engine.health()
