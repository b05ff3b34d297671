"""`translator serve`: a model behind HTTP, in LibreTranslate's shape, with dynamic batching, and a page at /.

    POST /translate  {"q": "Ein Hund." or [...], "source": "de" (or "auto"), "target": "en", "format": "text",
                      "alternatives": 2,                                  (LibreTranslate's fields)
                      "beam_size": 5, "alpha": 0.6, "sampling": {"temperature": 0.8, "seed": 1},
                      "attention": true}                                  (this project's)
                  -> {"translatedText": ..., "alternatives": [...], "scores": [...], "attention": {...}}
                     (or the same fields as a form: q=Ein+Hund.&source=de&target=en&alternatives=2)
    GET /languages   the model's pair;   GET /health   200 once the model is loaded;   GET /   the page

Requests that arrive while a batch decodes wait in a queue; the next batch takes every waiting
request with the same decoding options, up to `decode.max_tokens`, and hands their sentences
to `Translator.translate` as one list. Batch invariance makes each result the one the request
would get alone, up to the kernels' rounding for other batch shapes (rare in bf16; not so in
int8). With `--rerank-with`, every beam search (not greedy search or sampling) is reranked by
a model of the reverse pair, as `translate --rerank-with` reranks it, and its scores are the reranked
ones. FastAPI and uvicorn are imported by this module only (`translator[serve]`).
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.parse
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from .api import Translator, check_encodable
from .config import RecipeError
from .search import Sampling

PAGE = Path(__file__).parent / "static" / "index.html"


@dataclass(frozen=True)
class Limits:
    max_sentences: int = 100  # per request
    max_chars: int = 10_000  # per request, all sentences together
    max_hypotheses: int = 16  # per sentence: the beam, or the samples (alternatives + 1), so no request asks for unbounded work
    # per request with `attention: true`, its sentences together: a sentence's maps grow with the square of its
    # pieces (17 MB of JSON at 128, the main recipe's size), so a sum bounds the response where a per-sentence limit would not
    max_attention_pieces: int = 128

    @property
    def max_body_bytes(self) -> int:
        # A character takes at most 12 bytes of JSON (an escaped surrogate pair, "\ud83d\ude00"); 64 KiB for the rest.
        return 12 * self.max_chars + 65_536


@dataclass(frozen=True)
class Reranking:
    """A model of the reverse pair that reranks every beam search's hypotheses (`serve --rerank-with`)."""

    model: Translator
    weight: float | None = None  # None: the served model's decode.rerank_weight


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    q: str | list[str]
    source: str
    target: str
    format: Literal["text"] = "text"
    alternatives: int = Field(0, ge=0)
    api_key: str = ""  # LibreTranslate clients send one; this server checks none (see README: reverse proxy)
    beam_size: int | None = None
    alpha: float | None = None
    sampling: SamplingFields | None = None
    attention: bool = False  # the attention maps of each sentence's best translation


@dataclass
class Job:
    sentences: list[str]
    options: dict  # keyword arguments of Translator.translate
    key: object  # jobs with equal keys may share a batch
    cost: tuple[int, int]  # sentences, longest in source tokens
    future: asyncio.Future


class Batcher:
    """One task decodes, in a worker thread; requests that arrive meanwhile queue for the next batch."""

    def __init__(self, translator: Translator, wait_s: float):
        self.translator, self.wait_s = translator, wait_s
        self.queue: deque[Job] = deque()
        self.decoding = 0  # requests in the batch being decoded
        self.arrived = asyncio.Event()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    def submit(self, sentences: list[str], options: dict, longest: int) -> asyncio.Future:
        """`longest`: the longest sentence's tokens, its end-of-sentence token included."""
        key = tuple(options.items())  # samples batch too: seeded ones depend on the seed and the sentence alone, unseeded ones draw apart
        job = Job(sentences, options, key, (len(sentences), longest), asyncio.get_running_loop().create_future())
        self.queue.append(job)
        self.arrived.set()
        return job.future

    def in_progress(self) -> int:
        """Requests waiting or being decoded."""
        return self.decoding + sum(not job.future.done() for job in self.queue)

    async def run(self) -> None:
        while True:
            if not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
                await asyncio.sleep(self.wait_s)  # a request reaching an idle server waits a moment for company
            jobs = self._take()
            if jobs:
                await self._decode(jobs)

    def _take(self) -> list[Job]:
        """The oldest job and the waiting ones with its options, while sentences x longest <= decode.max_tokens."""
        budget = self.translator.recipe.decode.max_tokens
        taken, rest, sentences, longest = [], deque(), 0, 0
        for job in self.queue:
            if job.future.done():  # its client went away
                continue
            n, length = sentences + job.cost[0], max(longest, job.cost[1])
            if not taken or (job.key == taken[0].key and n * length <= budget):
                taken.append(job)
                sentences, longest = n, length
            else:
                rest.append(job)
        self.queue = rest
        return taken

    async def _decode(self, jobs: list[Job]) -> None:
        sentences = [s for job in jobs for s in job.sentences]
        loop = asyncio.get_running_loop()
        self.decoding = len(jobs)
        try:
            results = await loop.run_in_executor(self.worker, lambda: self.translator.translate(sentences, **jobs[0].options))
        except Exception as e:  # noqa: BLE001 - the requests get the error, the server goes on
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        finally:
            self.decoding = 0
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(results[start:start + len(job.sentences)])
            start += len(job.sentences)


def create_app(translator: Translator, limits: Limits = Limits(), batch_wait_ms: float = 5.0,
               reranking: Reranking | None = None) -> FastAPI:
    """The service for one loaded Translator (tests drive it in process with fastapi.testclient)."""
    data = translator.recipe.data
    try:  # the operator's decoding settings, checked once: a bad one would refuse every request, naming a field it never sent
        _checked(TranslateRequest(q="", source=data.src_lang, target=data.tgt_lang), translator, limits, reranking)
    except HTTPException as e:
        raise RecipeError(f"a request of the defaults would be refused: {e.detail}") from None
    state: dict[str, Batcher] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = state["batcher"] = Batcher(translator, batch_wait_ms / 1000)
        task = asyncio.create_task(batcher.run())
        yield  # uvicorn returns here after the requests in flight have been answered
        task.cancel()
        batcher.worker.shutdown(wait=True)
        translator.close()  # its decoding processes (--workers), if any

    app = FastAPI(title="translator", summary=f"{translator.recipe.name}: {data.src_lang} -> {data.tgt_lang}", lifespan=lifespan)
    app.add_middleware(FormAsJson)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)  # added last: it sees the raw body first
    _add_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": translator.recipe.name, "source": data.src_lang, "target": data.tgt_lang,
                "requests_in_progress": state["batcher"].in_progress(), "max_hypotheses": limits.max_hypotheses}

    @app.get("/languages")
    async def languages() -> list[dict]:
        return [{"code": data.src_lang, "name": data.src_lang, "targets": [data.tgt_lang]}]

    @app.post("/translate")
    async def translate(body: TranslateRequest, request: Request) -> Response:
        sentences, options, longest = _checked(body, translator, limits, reranking)
        future = state["batcher"].submit(sentences, options, longest)
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([future, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not future.done():  # the client left: drop its sentences if they are still waiting
            future.cancel()
            return Response(status_code=499)
        # Built off the event loop: attention maps make large responses, and /health must not wait for them.
        return await asyncio.get_running_loop().run_in_executor(None, lambda: JSONResponse(_response(body, future.result(), data.src_lang)))

    return app


def _checked(body: TranslateRequest, translator: Translator, limits: Limits,
             reranking: Reranking | None = None) -> tuple[list[str], dict, int]:
    """The request's sentences, Translator.translate options validated as translate validates them, and the longest
    sentence's tokens (with its end-of-sentence token)."""
    data = translator.recipe.data
    source = data.src_lang if body.source == "auto" else body.source  # LibreTranslate's "detect it": the model reads one language
    if (source, body.target) != (data.src_lang, data.tgt_lang):
        raise HTTPException(400, f"source/target {body.source}/{body.target}: this model translates {data.src_lang} to {data.tgt_lang}")
    sentences = [body.q] if isinstance(body.q, str) else body.q
    if len(sentences) > limits.max_sentences:
        raise HTTPException(400, f"q: {len(sentences)} sentences, over the limit of {limits.max_sentences} (--max-sentences)")
    chars = sum(map(len, sentences))
    if chars > limits.max_chars:
        raise HTTPException(400, f"q: {chars} characters, over the limit of {limits.max_chars} (--max-chars)")
    try:
        check_encodable(sentences, "q")
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    encoded = translator.tokenizer.encode(sentences)
    if (i := next((i for i, ids in enumerate(encoded) if not translator.fits(ids)), None)) is not None:
        # translate() would cut it: the client would lose its end unknowingly
        raise HTTPException(400, f"q: sentence {i} has {len(encoded[i]) + 1} tokens with its end-of-sentence token, "
                                 f"over this model's {translator.recipe.model.max_positions} positions (split it into shorter sentences)")
    pieces = [len(ids) for ids in encoded]
    longest = max(pieces, default=-1) + 1  # tokens with the end-of-sentence one (0: no sentence)
    if body.attention and sum(pieces) > limits.max_attention_pieces:
        raise HTTPException(400, f"attention: the sentences have {sum(pieces)} pieces together, over the "
                                 f"{limits.max_attention_pieces} whose maps a response carries (ask in smaller requests)")
    n_best = body.alternatives + 1
    beam_size = body.beam_size
    if beam_size is None and body.sampling is None and n_best > 1:  # alternatives need that many beams
        beam_size = max(translator.recipe.decode.beam_size, n_best)
    if body.sampling is None and isinstance(beam_size, int) and 1 <= beam_size < n_best:
        raise HTTPException(400, f"alternatives: {body.alternatives} need beam_size {n_best} or more, got beam_size {beam_size}")
    # What the request asks for (the recipe's own beam is the operator's choice): a beam, or alternatives + 1
    # samples or beams (the recipe's beam widened to them). Checked first: it names the field the client sent.
    field, hypotheses = ("beam_size", body.beam_size) if body.beam_size is not None and not body.sampling else ("alternatives", n_best)
    if hypotheses > limits.max_hypotheses:
        raise HTTPException(400, f"{field}: {getattr(body, field)} asks for {hypotheses} hypotheses a sentence, "
                                 f"over the limit of {limits.max_hypotheses} (--max-hypotheses)")
    try:
        sampling = Sampling(**body.sampling.model_dump()) if body.sampling else None
        options = dict(beam_size=beam_size, alpha=body.alpha, n_best=n_best, sampling=sampling, return_attention=body.attention)
        if reranking and sampling is None and (beam_size or translator.recipe.decode.beam_size) > 1:  # a beam search
            options.update(rerank=reranking.model, rerank_weight=reranking.weight)
        translator.translate([], **options)  # validates the options; decodes nothing
    except (ValueError, RecipeError) as e:
        raise HTTPException(400, str(e).removeprefix("decode.").replace("Sampling.", "sampling.")) from None  # the field, as the request names it
    return sentences, options, longest


def _response(body: TranslateRequest, results: list[list], src_lang: str) -> dict:
    def per_sentence(values: list):
        return values[0] if isinstance(body.q, str) else values

    response = {"translatedText": per_sentence([hyps[0].text for hyps in results])}
    if body.source == "auto":  # LibreTranslate names the language it detected; here the model's own, taken, not detected
        response["detectedLanguage"] = per_sentence([{"language": src_lang} for _ in results])
    if body.alternatives:
        response["alternatives"] = per_sentence([[t.text for t in hyps[1:]] for hyps in results])
        response["scores"] = per_sentence([[round(t.score, 4) for t in hyps] for hyps in results])
    if body.attention:
        maps = [hyps[0].attention for hyps in results]
        response["attention"] = per_sentence([m.to_dict() if m is not None else None for m in maps])
    return response


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` is a 413 before it is read whole, whether its length
    is declared or it comes in chunks. (Starlette's own limit answers in plain text, not JSON.)"""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"body over the limit of {self.max_bytes} bytes (set by --max-chars)"
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(413, message)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, message)
            return event

        await self.app(scope, limited_receive, send)


class FormAsJson:
    """ASGI middleware: a form body (application/x-www-form-urlencoded: LibreTranslate's own API takes
    its fields so, and many of its clients send them so) becomes the JSON object the endpoint reads. A
    repeated `q` is a list of sentences; numbers and booleans are converted, and a value that does not
    convert is left as text, for the endpoint's validation to name its field."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        headers = scope.get("headers", [])
        media_type = dict(headers).get(b"content-type", b"").split(b";")[0].strip().lower()  # case-insensitive (RFC 9110)
        if scope["type"] != "http" or media_type != b"application/x-www-form-urlencoded":
            return await self.app(scope, receive, send)
        chunks, event = [], {"more_body": True}
        try:
            while event.get("more_body"):
                event = await receive()
                chunks.append(event.get("body", b""))
        except HTTPException as e:  # BodyLimit's 413, raised here, outside the app's handlers
            return await _error(e.status_code, str(e.detail))(scope, receive, send)
        if event["type"] == "http.disconnect":  # the client left mid-upload: nothing to answer
            return
        try:
            as_json = json.dumps(_form_fields(b"".join(chunks))).encode()
        except UnicodeDecodeError:
            return await _error(400, "body: the form's text is not valid UTF-8")(scope, receive, send)
        headers = [(k, v) for k, v in headers if k not in (b"content-type", b"content-length")]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json"), (b"content-length", str(len(as_json)).encode())]}
        pending = [{"type": "http.request", "body": as_json, "more_body": False}]

        async def json_receive():  # the body once, then the client's own events (a disconnect)
            return pending.pop() if pending else await receive()

        await self.app(scope, json_receive, send)


def _form_fields(body: bytes) -> dict:
    fields: dict[str, list[str]] = {}
    for name, value in urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict"):
        fields.setdefault(name, []).append(value)
    converted: dict = {name: values if name == "q" and len(values) > 1 else values[-1] for name, values in fields.items()}
    for name, convert in (("alternatives", int), ("beam_size", int), ("alpha", float), ("attention", _form_bool)):
        with suppress(KeyError, ValueError):
            converted[name] = convert(converted[name])
    return converted


def _form_bool(text: str) -> bool:
    return {"true": True, "false": False, "1": True, "0": False}[text.lower()]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is one JSON line, {"error": "..."}, as LibreTranslate answers."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _describe(exc.errors()[0]))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"{type(exc).__name__}: {exc}")


def _describe(error: dict) -> str:
    """A pydantic/FastAPI validation error as one line that names the field."""
    loc = [str(part) for part in error["loc"] if part != "body"]
    if error["type"] == "json_invalid":
        return f"malformed JSON: {error.get('ctx', {}).get('error', error['msg'])}"
    if not loc:
        what = "empty body" if error["type"] == "missing" else "body"
        return f"{what}: expected a JSON object with q, source and target (Content-Type: application/json)"
    if loc[0] == "q" and error["type"] != "missing":  # a union: pydantic reports each branch
        return "q: expected a string or a list of strings"
    if error["type"] == "extra_forbidden":
        fields = SamplingFields.model_fields if loc[0] == "sampling" else TranslateRequest.model_fields
        return f"{'.'.join(loc)}: unknown field (expected one of {', '.join(fields)})"
    return f"{'.'.join(loc)}: {error['msg']}"


def serve(translator: Translator, host: str, port: int, limits: Limits, batch_wait_ms: float, reranking: Reranking | None) -> None:
    """Run the service until SIGINT or SIGTERM; the requests in flight are answered first."""
    import uvicorn

    # uvicorn raises the signal again once it has shut down gracefully. By then every request
    # has been answered, so SIGTERM ends in an ordinary exit (status 0) instead of a kill.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server = uvicorn.Server(uvicorn.Config(create_app(translator, limits, batch_wait_ms, reranking), host=host, port=port, log_level="info"))
    try:
        server.run()
    except SystemExit:  # uvicorn's way out when it cannot start (a port in use, say), after logging why
        raise RuntimeError(f"could not serve on {host}:{port} (uvicorn's error above says why)") from None
