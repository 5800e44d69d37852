"""``peftlab serve``: an OpenAI-compatible HTTP server over an adapter set (FastAPI + uvicorn).

    peftlab serve sentiment=runs/sentiment/version_0 topics=exports/topics --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="topics", prompt="Stocks fell sharply", max_tokens=8)

Endpoints: ``GET /health``, ``GET /v1/models`` (every adapter and ``base``, the plain backbone), ``POST
/v1/completions``, ``POST /v1/chat/completions`` (the messages go through the tokenizer's chat template) and ``POST
/v1/classify`` for classification adapters. As in vLLM's multi-LoRA server, the request's ``model`` names the
adapter; a completion's prompt is sent as given (``Run.predict(raw=True)``), a chat's messages go through the run's
chat template when it was trained on chat data (``Run.chat``'s format), else through the tokenizer's. Decoding is
greedy unless a request sets ``temperature`` > 0 (then sampled, with ``top_p``); a request with a ``seed`` is
generated on its own, so the same seed gives the same answer as :meth:`peftlab.api.Run.predict` of that adapter alone
with that seed.

Requests that arrive together are **batched across adapters**: a single worker takes up to ``max_batch_size``
requests from a bounded queue (waiting at most ``max_wait_ms`` for more), runs them as one mixed batch
(:meth:`peftlab.adapter_set.AdapterSet.predict`, grouped per adapter inside it) and answers each. A full queue
answers 503, a request not answered within ``timeout_s`` 504; a bad request (unknown adapter, malformed body, a prompt
longer than the context, an option peftlab does not implement) answers 4xx with one line, and the server keeps
serving. ``stream: true`` streams the answer token by token as server-sent events (OpenAI's chunks, then
``[DONE]``); a streamed request is generated on its own by the same worker (not batched with others), so the
streamed text is the text the request gets unstreamed. A streamed generation stops at the next token when its
client goes away or one of its ``stop`` strings has arrived, so the worker moves on to the queue.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

from transformers.generation.streamers import BaseStreamer

from peftlab.api import load_adapters
from peftlab.errors import PeftLabError

try:  # the `serve` extra
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError:  # pragma: no cover - only without the extra
    FastAPI = None
    BaseModel = object

    def ConfigDict(**kwargs):  # noqa: N802
        return kwargs

    def Field(default=None, **kwargs):  # noqa: N802
        return default


class _Request(BaseModel):
    # an option the server does not implement is refused by name, never ignored
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    user: str | None = None
    seed: int | None = None  # with temperature > 0: the request is sampled alone, reproducibly


class CompletionRequest(_Request):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[str]


class BadRequest(Exception):
    """An HTTP error with one line for the client (OpenAI's error body)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


class _Pieces(BaseStreamer):
    """A streamer for ``generate`` that hands every newly decoded piece of the answer to ``push`` (called on the
    worker's thread), token by token. transformers' TextStreamer waits for a space or a newline before it prints
    (to avoid half words), which holds a whole answer back when it has none. Here each token is decoded with the
    few tokens before it (the incremental detokenization of text-generation-inference and vLLM: the context keeps
    a SentencePiece word's leading space, and each decode stays short), and an incomplete character (a trailing
    U+FFFD) waits for its next bytes."""

    def __init__(self, tokenizer, push, cancelled: threading.Event | None = None):
        self.tokenizer, self.push, self.cancelled = tokenizer, push, cancelled
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is the context already sent
        self.prompt_seen = False
        self.text = ""  # everything pushed so far

    def put(self, value) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise _Cancelled  # ends generate(): nobody reads the rest
        if not self.prompt_seen:  # generate() puts the prompt (or the decoder's start) first
            self.prompt_seen = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        sent = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if (final or not text.endswith("\ufffd")) and len(text) > len(sent):
            self.text += text[len(sent):]
            self.push(text[len(sent):])
            self.prefix, self.read = self.read, len(self.ids)


class _Cancelled(Exception):
    """Raised inside ``generate`` by a cancelled stream's streamer."""


class _Stream:
    """One streamed answer: the queue its pieces arrive in (then None), and ``cancelled``, set when its client has
    gone away or a stop string ended it (its generation stops at the next token)."""

    def __init__(self):
        self.pieces: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()


class Batcher:
    """One worker that runs queued requests as mixed batches (see the module docstring)."""

    def __init__(self, adapters, max_batch_size: int, max_wait_ms: float, max_queue: int):
        self.adapters = adapters
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.batches: list[int] = []  # sizes of the batches run (the tests and the benchmark read them)
        self.streamed: list[int] = []  # tokens generated for each streamed request (the tests read them)

    def submit(self, adapter: str, text, max_new_tokens: int | None, raw: bool = True,
               add_special_tokens: bool | None = None, settings: dict | None = None,
               stream: _Stream | None = None) -> asyncio.Future:
        """Queue one prompt (``raw``: as given; else in the adapter's training prompt format, a chat run's messages;
        ``add_special_tokens`` False for a text a chat template rendered, None for the run's default; ``settings``:
        sampling settings; ``stream``: receives the answer's pieces as they are generated, then None)."""
        future = asyncio.get_running_loop().create_future()
        key = (max_new_tokens, raw, add_special_tokens, tuple(sorted((settings or {}).items())))
        try:
            self.queue.put_nowait((adapter, text, key, future, stream))
        except asyncio.QueueFull:
            raise BadRequest(503, f"the server's queue is full ({self.queue.maxsize} requests); retry later",
                             "server_busy") from None
        return future

    async def run(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(jobs) < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    break
            # a client that timed out or went away: its future is done, or its stream cancelled
            jobs = [j for j in jobs if not j[3].done() and not (j[4] is not None and j[4].cancelled.is_set())]
            groups: dict[tuple, list] = {}
            for i, job in enumerate(jobs):
                # streamed and seeded requests run alone: their answer must not depend on who else is in the batch
                alone = job[4] is not None or dict(job[2][3]).get("seed") is not None
                groups.setdefault((i,) if alone else job[2], []).append(job)
            for group in groups.values():
                self.batches.append(len(group))
                try:
                    if group[0][4] is not None:
                        results = [await asyncio.to_thread(self._stream, group[0], asyncio.get_running_loop())]
                    else:
                        (max_new_tokens, raw, special, settings) = group[0][2]
                        results = await asyncio.to_thread(
                            self.adapters.predict, [j[1] for j in group], adapter=[j[0] for j in group],
                            max_new_tokens=max_new_tokens, raw=raw, add_special_tokens=special, **dict(settings))
                except Exception as err:  # noqa: BLE001 - answered to the clients; the worker keeps serving
                    for job in group:
                        if not job[3].done():
                            job[3].set_exception(err)
                        if job[4] is not None:
                            job[4].pieces.put_nowait(None)
                    continue
                for job, result in zip(group, results):
                    if not job[3].done():
                        job[3].set_result(result)

    def _stream(self, job, loop) -> dict:
        """Generate one request alone, pushing its pieces into its stream queue as they are decoded."""
        name, text, (max_new_tokens, raw, special, settings), _, stream = job
        push = lambda piece: loop.call_soon_threadsafe(stream.pieces.put_nowait, piece)  # noqa: E731
        streamer = _Pieces(self.adapters.run(name).module.tokenizer, push, stream.cancelled)
        try:
            return self.adapters.predict([text], adapter=name, max_new_tokens=max_new_tokens, raw=raw,
                                         add_special_tokens=special, **dict(settings), streamer=streamer)[0]
        except _Cancelled:
            return {"generated": streamer.text}
        finally:
            self.streamed.append(len(streamer.ids))
            push(None)


def create_app(adapters, *, max_batch_size: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256,
               timeout_s: float = 60.0):
    """The FastAPI application serving ``adapters`` (an :class:`~peftlab.adapter_set.AdapterSet`)."""
    if FastAPI is None:
        raise PeftLabError("peftlab serve needs FastAPI and uvicorn: pip install 'peftlab[serve]'")
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = batcher = Batcher(adapters, max_batch_size, max_wait_ms, max_queue)
        app.state.batcher = batcher
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()

    app = FastAPI(title="peftlab serve", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, err: BadRequest):
        return _error(err.status, err.message, err.kind)

    @app.exception_handler(PeftLabError)
    async def refused(request: Request, err: PeftLabError):  # peftlab's own one-line refusals (e.g. from predict)
        return _error(400, str(err))

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, err: RequestValidationError):
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            problems.append("the body is not valid JSON" if e.get("type") == "json_invalid" else f"{where}: {e['msg']}")
        return _error(400, "malformed request: " + "; ".join(problems[:3]))

    def run_of(name: str):
        try:
            return adapters.run(name)
        except PeftLabError:
            raise BadRequest(404, f"the model {name!r} does not exist; this server has: "
                                  f"{', '.join(['base', *adapters.names])}", "not_found_error") from None

    def check_generation(body: _Request, run) -> tuple[int, dict]:
        """``(max_new_tokens, sampling settings)`` of a request: greedy unless ``temperature`` > 0."""
        if body.n not in (None, 1):
            raise BadRequest(400, "peftlab serve returns one choice per prompt: n must be 1 (send n requests)")
        if run.module.task == "classification":
            raise BadRequest(400, f"{body.model!r} is a classification adapter: POST /v1/classify instead")
        settings: dict = {}
        if body.temperature not in (None, 0, 0.0):
            if body.top_p is not None and not 0 < body.top_p <= 1:
                raise BadRequest(400, f"top_p must be in (0, 1] (got {body.top_p})")
            settings = {"do_sample": True, "temperature": float(body.temperature), "top_p": float(body.top_p or 1.0),
                        "top_k": 0}
            if body.seed is not None:
                settings["seed"] = int(body.seed)
        elif body.top_p not in (None, 1, 1.0):
            raise BadRequest(400, "top_p needs sampling: set temperature > 0, or leave top_p out (greedy decoding)")
        return body.max_tokens or run.module.hparams.max_new_tokens, settings

    def check_length(run, text: str, max_new_tokens: int, special: bool = True) -> int:
        tok = run.module.tokenizer
        n = len(tok(text, add_special_tokens=special)["input_ids"])
        # the shared backbone's config: a wrapper such as P-tuning v2's input-tokens model has none of its own
        limit = min(run.max_length, getattr(adapters.backbone.config, "max_position_embeddings", None) or 10 ** 9)
        if n + max_new_tokens > limit:
            raise BadRequest(400, f"the prompt has {n} tokens and max_tokens is {max_new_tokens}: more than the "
                                  f"{limit} tokens this model takes; shorten the prompt or lower max_tokens")
        return n

    async def answer(name: str, text, max_new_tokens: int | None, raw: bool = True,
                     add_special_tokens: bool | None = None, settings: dict | None = None) -> dict:
        future = state["batcher"].submit(name, text, max_new_tokens, raw, add_special_tokens, settings)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise BadRequest(504, f"no answer within {timeout_s} s; the server is overloaded, retry later",
                             "timeout") from None

    async def streamed(name: str, text, max_new_tokens: int, raw: bool, special: bool | None, settings: dict,
                       stop, tok, chunk) -> StreamingResponse:
        """Stream one answer: ``chunk(piece, finish_reason)`` is the event for a piece of text (or the end). The
        first piece is awaited before the response starts, so a queue that is full or too slow is still a 503 / 504."""
        stream = _Stream()
        pieces = stream.pieces
        future = state["batcher"].submit(name, text, max_new_tokens, raw, special, settings, stream=stream)
        try:
            first = await asyncio.wait_for(pieces.get(), timeout_s)
        except asyncio.TimeoutError:
            stream.cancelled.set()
            raise BadRequest(504, f"no answer within {timeout_s} s; the server is overloaded, retry later",
                             "timeout") from None
        except BaseException:  # the client went away before the first piece
            stream.cancelled.set()
            raise
        if first is None:  # nothing was generated: the request failed (or the answer is empty)
            await asyncio.wait_for(future, timeout_s)  # a failure raises here, before the stream starts
        stops = [stop] if isinstance(stop, str) else [x for x in (stop or []) if x]

        def held(text: str) -> int:
            """How many trailing characters could still be the start of a stop string (not sent yet)."""
            return max((k for x in stops for k in range(1, min(len(x), len(text) + 1)) if text.endswith(x[:k])),
                       default=0)

        async def events():
            try:
                async for event in answered():
                    yield event
            finally:  # finished, or the client went away (the generator is closed): generation stops
                stream.cancelled.set()

        async def answered():
            sent, text, piece, stopped = "", "", first, False
            while piece is not None:
                if not stopped:
                    text, stopped = cut(text + piece, stop)
                    if stopped:  # the rest would be cut: stop generating
                        stream.cancelled.set()
                    ready = text if stopped else text[:len(text) - held(text)]
                    if len(ready) > len(sent):
                        yield f"data: {json.dumps(chunk(ready[len(sent):], None))}\n\n"
                        sent = ready
                piece = await pieces.get()
            try:
                result = await future
                text_all, stopped_all = cut(result["generated"], stop)
                if len(text_all) > len(sent) and text_all.startswith(sent):  # what decoding settled at the end
                    yield f"data: {json.dumps(chunk(text_all[len(sent):], None))}\n\n"
                    sent = text_all
                _, reason = finish(tok, sent, stopped or stopped_all, max_new_tokens)
                yield f"data: {json.dumps(chunk('', reason))}\n\n"
            except Exception as err:  # noqa: BLE001 - the stream has started: the error is its last event
                yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error', 'code': 500}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def cut(text: str, stop) -> tuple[str, bool]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        hits = [text.index(s) for s in stops if s and s in text]
        return (text[:min(hits)], True) if hits else (text, False)

    def finish(tok, text: str, stopped: bool, max_new_tokens: int) -> tuple[int, str]:
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        return n, "stop" if stopped or n < max_new_tokens else "length"

    @app.get("/health")
    async def health():
        return {"status": "ok", "adapters": adapters.names}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "peftlab"}
                                           for name in ["base", *adapters.names]]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        run = run_of(body.model)
        max_new_tokens, settings = check_generation(body, run)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise BadRequest(400, "prompt is an empty list; give at least one prompt")
        counts = [check_length(run, p, max_new_tokens) for p in prompts]
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            if len(prompts) > 1:
                raise BadRequest(400, "stream: true takes one prompt; send one streamed request per prompt")

            def chunk(text: str, reason):
                return {"id": ident, "object": "text_completion", "created": now, "model": body.model,
                        "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}

            return await streamed(body.model, prompts[0], max_new_tokens, True, None, settings, body.stop,
                                  run.module.tokenizer, chunk)
        results = await asyncio.gather(*(answer(body.model, p, max_new_tokens, settings=settings) for p in prompts))
        choices, used = [], 0
        for i, result in enumerate(results):
            text, stopped = cut(result["generated"], body.stop)
            n, reason = finish(run.module.tokenizer, text, stopped, max_new_tokens)
            used += n
            choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
        return {"id": ident, "object": "text_completion", "created": now, "model": body.model, "choices": choices,
                "usage": {"prompt_tokens": sum(counts), "completion_tokens": used, "total_tokens": sum(counts) + used}}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        run = run_of(body.model)
        max_new_tokens, settings = check_generation(body, run)
        tok = run.module.tokenizer
        messages = [m.model_dump() for m in body.messages]
        if getattr(run, "is_chat", False):  # a chat run: its own chat template and system prompt (Run.chat's)
            text, raw, special = messages, False, None
            count = check_length(run, run.format_prompt(messages), max_new_tokens, special=False)
        elif getattr(tok, "chat_template", None):  # else the tokenizer's template, as vLLM does
            # the template writes the special tokens (BOS, ...) itself: none are added again, as in vLLM
            text, raw, special = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True, False
            count = check_length(run, text, max_new_tokens, special=False)
        else:
            raise BadRequest(400, f"{body.model!r} has no chat template (it was not trained on chat data and its "
                                  "tokenizer defines none); use /v1/completions with a plain prompt")
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:  # OpenAI's chat.completion.chunk events: the role first, then the content piece by piece
            def chunk(piece: str, reason):
                delta = {} if reason else {"content": piece}
                return {"id": ident, "object": "chat.completion.chunk", "created": now, "model": body.model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

            first = True

            def with_role(piece: str, reason):
                nonlocal first
                event = chunk(piece, reason)
                if first:
                    event["choices"][0]["delta"]["role"] = "assistant"
                    first = False
                return event

            return await streamed(body.model, text, max_new_tokens, raw, special, settings, body.stop, tok, with_role)
        result = await answer(body.model, text, max_new_tokens, raw, special, settings)
        content, stopped = cut(result["generated"], body.stop)
        n, reason = finish(tok, content, stopped, max_new_tokens)
        return {"id": ident, "object": "chat.completion", "created": now, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": reason}],
                "usage": {"prompt_tokens": count, "completion_tokens": n, "total_tokens": count + n}}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest):
        run = run_of(body.model)
        if run.module.task != "classification":
            raise BadRequest(400, f"{body.model!r} is a {run.module.task} adapter, not a classifier: use "
                                  "/v1/completions")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise BadRequest(400, "input is an empty list; give at least one text")
        for t in texts:
            check_length(run, t, 0)
        results = await asyncio.gather(*(answer(body.model, t, None) for t in texts))
        return {"object": "list", "model": body.model,
                "data": [{"index": i, **r} for i, r in enumerate(results)]}

    return app


class Server:
    """uvicorn serving an app on a background thread (tests, benchmarks, notebooks); ``url`` once started."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise PeftLabError("the server did not start (is the port taken?)")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_command(adapters: list[str], /, host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
                  max_batch_size: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256,
                  timeout_s: float = 60.0) -> None:
    """Serve trained adapters on one backbone over an OpenAI-compatible HTTP API (model = adapter name).

    Args:
        adapters: ``NAME=PATH`` for each adapter: a run directory (``runs/x/version_0``) or an exported adapter.
        host: address to listen on (``0.0.0.0`` for every interface).
        port: TCP port.
        device: where the backbone and adapters live (e.g. ``cuda``); default: where loading puts them.
        max_batch_size: the most requests run together as one mixed batch.
        max_wait_ms: how long the worker waits for more requests to fill a batch.
        max_queue: requests waiting beyond this are answered 503.
        timeout_s: a request not answered within this many seconds is answered 504.

    Examples:
        peftlab serve sentiment=runs/sentiment/version_0 topics=exports/topics --port 8000
    """
    if FastAPI is None:
        raise PeftLabError("peftlab serve needs FastAPI and uvicorn: pip install 'peftlab[serve]'")
    pairs = {}
    for item in adapters:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise PeftLabError(f"adapter {item!r}: give NAME=PATH, e.g. sentiment=runs/sentiment/version_0")
        if name in pairs:
            raise PeftLabError(f"adapter name {name!r} is given twice; give each adapter its own name")
        pairs[name] = path
    if not pairs:
        raise PeftLabError("give at least one adapter as NAME=PATH")
    app = create_app(load_adapters(pairs, device=device), max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                     max_queue=max_queue, timeout_s=timeout_s)
    print(f"[peftlab] serving {', '.join(pairs)} (and base) on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
