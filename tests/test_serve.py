"""`translator serve`: the API in process, the batching queue, and the real server (signals, a client that leaves)."""

import asyncio
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import ROOT  # noqa: E402
from translator import Sampling, Translator  # noqa: E402
from translator.config import RecipeError, recipe_from_dict  # noqa: E402
from translator.serve import Batcher, Limits, Reranking, create_app  # noqa: E402

SENTENCES = ["Ein mann sieht der hut.", "Der alte hund trägt ein ball und ein hut.", "Ein kind fährt.", "Die kleine frau sieht ein fahrrad."]
PAIR = {"source": "de", "target": "en"}


@pytest.fixture(scope="module")
def client(tiny_translator):
    with TestClient(create_app(tiny_translator, Limits(max_sentences=8, max_chars=400))) as c:
        yield c


def test_translate_answers_in_libretranslates_shape(client, tiny_translator):
    one = client.post("/translate", json={"q": SENTENCES[1], **PAIR, "format": "text"})
    assert one.status_code == 200 and one.json() == {"translatedText": tiny_translator.translate(SENTENCES[1])}
    many = client.post("/translate", json={"q": SENTENCES, **PAIR})
    assert many.json() == {"translatedText": tiny_translator.translate(SENTENCES)}


def test_source_auto_is_the_models_source_language_as_libretranslate_clients_send_it(client, tiny_translator):
    # Many LibreTranslate clients send source "auto" by default; a model reads one language, so that is the one taken.
    one = client.post("/translate", json={"q": SENTENCES[1], "source": "auto", "target": "en"})
    assert one.status_code == 200
    assert one.json() == {"translatedText": tiny_translator.translate(SENTENCES[1]), "detectedLanguage": {"language": "de"}}
    many = client.post("/translate", data={"q": SENTENCES[:2], "source": "auto", "target": "en"}).json()  # a form, as a list
    assert many == {"translatedText": tiny_translator.translate(SENTENCES[:2]), "detectedLanguage": [{"language": "de"}] * 2}
    wrong = client.post("/translate", json={"q": "x", "source": "auto", "target": "fr"})
    assert wrong.status_code == 400 and "translates de to en" in wrong.json()["error"]


def test_alternatives_are_the_n_best_with_scores(client, tiny_translator):
    answer = client.post("/translate", json={"q": SENTENCES[:2], **PAIR, "alternatives": 2, "beam_size": 3, "alpha": 0.6}).json()
    expected = tiny_translator.translate(SENTENCES[:2], beam_size=3, alpha=0.6, n_best=3)
    assert answer["translatedText"] == [hyps[0].text for hyps in expected]
    assert answer["alternatives"] == [[t.text for t in hyps[1:]] for hyps in expected]
    assert answer["scores"] == [[round(t.score, 4) for t in hyps] for hyps in expected]
    # Without beam_size, alternatives widen the recipe's beam to as many hypotheses as asked for.
    wide = client.post("/translate", json={"q": SENTENCES[0], **PAIR, "alternatives": 4}).json()
    assert [wide["translatedText"], *wide["alternatives"]] == [t.text for t in tiny_translator.translate(SENTENCES[0], beam_size=5, n_best=5)]


def test_a_form_body_is_read_as_libretranslate_reads_it(client):
    # LibreTranslate's own API takes its fields as a form, and many of its clients send them so.
    fields = {"q": SENTENCES[0], **PAIR, "alternatives": 2, "beam_size": 4, "alpha": 0.6, "api_key": ""}
    as_form = client.post("/translate", data={k: str(v) for k, v in fields.items()})
    assert as_form.status_code == 200 and as_form.json() == client.post("/translate", json=fields).json()
    many = client.post("/translate", content=urllib.parse.urlencode([("q", s) for s in SENTENCES[:2]] + list(PAIR.items())),
                       headers={"content-type": "application/x-www-form-urlencoded; charset=utf-8"})
    assert many.json() == client.post("/translate", json={"q": SENTENCES[:2], **PAIR}).json()  # a repeated q: a list
    shouted = client.post("/translate", content=urllib.parse.urlencode(fields),  # media types are case-insensitive
                          headers={"Content-Type": "Application/X-WWW-Form-URLEncoded ; Charset=UTF-8"})
    assert shouted.status_code == 200 and shouted.json() == as_form.json()


@pytest.mark.parametrize("form, words", [
    ({"q": "x", **PAIR, "alternatives": "two"}, ["alternatives:", "integer"]),
    ({"q": "x", **PAIR, "attention": "maybe"}, ["attention:", "boolean"]),
    ({"q": "x", **PAIR, "beam": "5"}, ["beam:", "unknown field"]),
    ({"q": "x", "source": "de"}, ["target", "required"]),
    ({"q": "x", **PAIR, "alpha": "nan"}, ["alpha"]),
])
def test_a_bad_form_field_is_named_as_in_json(client, form, words):
    answer = client.post("/translate", data=form)
    assert answer.status_code == 400 and all(w in answer.json()["error"] for w in words), answer.json()


def test_a_form_that_is_not_utf8_is_refused(client):
    answer = client.post("/translate", content=b"q=Ein+Hund%FF&source=de&target=en", headers={"content-type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 400 and "not valid UTF-8" in answer.json()["error"]
    assert client.post("/translate", data={"q": "Ein Hund läuft.", **PAIR}).status_code == 200  # raw UTF-8 text is fine


def test_sampling_and_attention_are_extra_fields(client, tiny_translator):
    answer = client.post("/translate", json={"q": SENTENCES[0], **PAIR, "sampling": {"temperature": 0.7, "seed": 3}, "alternatives": 1}).json()
    drawn = tiny_translator.translate(SENTENCES[0], sampling=Sampling(temperature=0.7, seed=3), n_best=2)
    assert [answer["translatedText"], *answer["alternatives"]] == [t.text for t in drawn]
    maps = client.post("/translate", json={"q": SENTENCES[1], **PAIR, "attention": True}).json()["attention"]
    expected = tiny_translator.translate(SENTENCES[1], return_attention=True).attention
    assert maps["source"] == expected.source and maps["target"] == expected.target
    assert len(maps["cross"][0][0]) == len(expected.target) and len(maps["cross"][0][0][0]) == len(expected.source)


def test_languages_and_health_name_the_models_pair(client):
    assert client.get("/languages").json() == [{"code": "de", "name": "de", "targets": ["en"]}]
    health = client.get("/health").json()
    assert health["status"] == "ok" and (health["source"], health["target"]) == ("de", "en")
    assert client.get("/").headers["content-type"].startswith("text/html")


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"", 400, ["empty body"]),
        (b'{"q": "Ein hund.", "source": ', 400, ["malformed JSON"]),
        (b"[1, 2]", 400, ["JSON object"]),
        (b'{"q": 3, "source": "de", "target": "en"}', 400, ["q:", "string"]),
        (b'{"q": ["x", 3], "source": "de", "target": "en"}', 400, ["q:", "list of strings"]),
        (b'{"q": "x", "source": "de"}', 400, ["target", "required"]),
        (b'{"q": "x", "source": "de", "target": "en", "beam": 5}', 400, ["beam:", "unknown field", "beam_size"]),
        (b'{"q": "x", "source": "de", "target": "en", "sampling": {"top_q": 1}}', 400, ["sampling.top_q", "top_p"]),
        (b'{"q": "x", "source": "de", "target": "fr"}', 400, ["de/fr", "translates de to en"]),
        (b'{"q": "x", "source": "en", "target": "de"}', 400, ["en/de", "translates de to en"]),
        (b'{"q": "x", "source": "de", "target": "en", "format": "html"}', 400, ["format"]),
        (b'{"q": "x", "source": "de", "target": "en", "beam_size": 0}', 400, ["beam_size", "at least 1"]),
        (b'{"q": "x", "source": "de", "target": "en", "beam_size": true}', 400, ["beam_size"]),
        (b'{"q": "x", "source": "de", "target": "en", "beam_size": 2, "alternatives": 2}', 400, ["alternatives: 2 need beam_size 3 or more, got beam_size 2"]),
        (b'{"q": "x", "source": "de", "target": "en", "alpha": "big"}', 400, ["alpha"]),
        (b'{"q": "x", "source": "de", "target": "en", "alpha": 1000}', 400, ["alpha: got 1000", "0 to 10"]),  # not an overflow's 500
        (b'{"q": ["x", "\\ud800"], "source": "de", "target": "en"}', 400, ["q: item 1", "lone surrogate"]),
        (json.dumps({"q": "x " * 100, "attention": True, **PAIR}).encode(), 400, ["attention: the sentences have", "pieces together, over the 128"]),
        # the maps of many sentences of a few pieces each: over 1 GB of JSON when the limit was per sentence
        (json.dumps({"q": ["x " * 60] * 3, "attention": True, **PAIR}).encode(), 400, ["attention: the sentences have", "together, over the 128"]),
        (b'{"q": "x", "source": "de", "target": "en", "sampling": {"top_p": 1.5}}', 400, ["sampling.top_p: got 1.5"]),
        (b'{"q": ["x", "x", "x", "x", "x", "x", "x", "x", "x"], "source": "de", "target": "en"}', 400, ["9 sentences", "limit of 8", "--max-sentences"]),
        (json.dumps({"q": "x" * 401, **PAIR}).encode(), 400, ["401 characters", "limit of 400", "--max-chars"]),
        (b'{"q": "x", "source": "de", "target": "en", "beam_size": 17}', 400, ["beam_size: 17", "17 hypotheses", "limit of 16", "--max-hypotheses"]),
        (b'{"q": "x", "source": "de", "target": "en", "alternatives": 16}', 400, ["alternatives: 16", "17 hypotheses", "--max-hypotheses"]),
        # more alternatives than the vocabulary allows beams: the limit is what the client was over, not a beam it never sent
        (b'{"q": "x", "source": "de", "target": "en", "alternatives": 150}', 400, ["alternatives: 150", "151 hypotheses", "--max-hypotheses"]),
        (b'{"q": "x", "source": "de", "target": "en", "alternatives": 16, "sampling": {"seed": 1}}', 400,
         ["alternatives: 16", "17 hypotheses", "limit of 16", "--max-hypotheses"]),
    ],
)
def test_bad_requests_get_one_line_json_errors_and_the_server_goes_on(client, body, status, words):
    answer = client.post("/translate", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status
    error = answer.json()["error"]
    assert "\n" not in error and all(w in error for w in words), error
    assert client.post("/translate", json={"q": "Ein hund.", **PAIR}).status_code == 200


def test_a_sentence_longer_than_the_models_positions_is_refused_not_cut(tiny_translator):
    limit = tiny_translator.recipe.model.max_positions
    pieces = lambda text: len(tiny_translator.tokenizer.encode([text])[0])  # noqa: E731
    words = ["hund"] * limit
    while pieces(" ".join(words)) > limit - 1:  # the longest sentence that fits, with its end-of-sentence token
        words.pop()
    fits = " ".join(words)
    with TestClient(create_app(tiny_translator, Limits(max_chars=100_000))) as c:
        answer = c.post("/translate", json={"q": [SENTENCES[0], fits], **PAIR})
        assert answer.status_code == 200 and answer.json() == {"translatedText": tiny_translator.translate([SENTENCES[0], fits])}
        answer = c.post("/translate", json={"q": [SENTENCES[0], fits + " hund hund"], **PAIR})
        assert answer.status_code == 400, answer.json()  # translate() would have cut it, and the client never known
        error = answer.json()["error"]
        assert "q: sentence 1 has" in error and f"over this model's {limit} positions" in error, error


def test_oversized_bodies_are_refused_before_they_are_read(client):
    limit = Limits(max_sentences=8, max_chars=400).max_body_bytes
    declared = client.post("/translate", content=b"x" * (limit + 1), headers={"content-type": "application/json"})
    assert declared.status_code == 413 and str(limit) in declared.json()["error"]
    chunked = client.post("/translate", content=(b"x" * 4096 for _ in range(limit // 4096 + 2)), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and "--max-chars" in chunked.json()["error"]
    form = client.post("/translate", content=(b"q=" + b"x" * 4096 for _ in range(limit // 4096 + 2)),
                       headers={"content-type": "application/x-www-form-urlencoded"})  # a form in chunks: read by the form middleware
    assert form.status_code == 413 and "--max-chars" in form.json()["error"]


class CountingTranslator(Translator):
    """The real Translator, recording the sentences of each call."""

    def __init__(self, translator: Translator, max_tokens: int):
        recipe = translator.recipe.to_dict()
        recipe["decode"]["max_tokens"] = max_tokens
        super().__init__(translator.model, translator.tokenizer, recipe_from_dict(recipe))
        self.calls: list[list[str]] = []

    def translate(self, sentences, **options):
        if sentences:  # the empty call validates a request's options
            self.calls.append(list(sentences))
        return super().translate(sentences, **options)


def longest(translator, sentences):
    return max((len(ids) + 1 for ids in translator.tokenizer.encode(sentences)), default=0)


def run_jobs(translator, jobs, wait_s=0.02, cancel=()):
    """Submit (sentences, options) jobs at once to a running Batcher; cancel some before decoding starts."""

    async def main():
        batcher = Batcher(translator, wait_s)
        worker = asyncio.create_task(batcher.run())
        futures = [batcher.submit(sentences, options, longest(translator, sentences)) for sentences, options in jobs]
        for i in cancel:
            futures[i].cancel()
        results = await asyncio.gather(*futures, return_exceptions=True)
        worker.cancel()
        batcher.worker.shutdown()
        return results

    return asyncio.run(main())


def options(**changes):
    return {"beam_size": None, "alpha": None, "n_best": 1, "sampling": None, "return_attention": False, **changes}


def test_waiting_requests_are_decoded_together_with_the_results_of_each_alone(tiny_translator):
    translator = CountingTranslator(tiny_translator, max_tokens=8192)
    jobs = [([s], options()) for s in SENTENCES * 3] + [(SENTENCES[:2], options())]
    results = run_jobs(translator, jobs)
    assert len(translator.calls) == 1 and len(translator.calls[0]) == 14
    for (sentences, _), result in zip(jobs, results):
        assert [hyps[0].text for hyps in result] == tiny_translator.translate(sentences)


def test_a_batch_holds_equal_options_within_the_token_budget(tiny_translator):
    budget = 3 * (max(len(ids) for ids in tiny_translator.tokenizer.encode(SENTENCES)) + 1)  # three sentences of the longest
    translator = CountingTranslator(tiny_translator, max_tokens=budget)
    seeded = Sampling(seed=1)
    jobs = [([s], options()) for s in SENTENCES] + [([SENTENCES[0]], options(beam_size=1)), ([SENTENCES[1]], options(sampling=seeded)),
                                                    ([SENTENCES[2]], options(sampling=seeded)), ([SENTENCES[3]], options(beam_size=1))]
    results = run_jobs(translator, jobs)
    sizes = sorted(len(call) for call in translator.calls)
    assert sum(sizes) == 8 and max(sizes) <= 3
    assert [SENTENCES[0], SENTENCES[3]] in translator.calls  # the two greedy requests, together
    assert [SENTENCES[1], SENTENCES[2]] in translator.calls  # seeded samples depend on the sentence alone: batched too
    for (sentences, opts), result in zip(jobs, results):
        alone = tiny_translator.translate(sentences, **opts)
        assert [[t.text for t in hyps] for hyps in result] == [[t.text for t in hyps] for hyps in alone]
        assert [t.score for hyps in result for t in hyps] == pytest.approx([t.score for hyps in alone for t in hyps], abs=1e-5)


def test_unseeded_sampling_requests_batch_and_draw_apart(tiny_translator):
    translator = CountingTranslator(tiny_translator, max_tokens=8192)
    unseeded = options(sampling=Sampling(temperature=2.0), n_best=4)
    results = run_jobs(translator, [([SENTENCES[1]], unseeded), ([SENTENCES[1]], unseeded)])
    assert translator.calls == [[SENTENCES[1], SENTENCES[1]]]
    assert [t.text for t in results[0][0]] != [t.text for t in results[1][0]]  # two clients, two draws


def test_a_request_whose_client_left_is_not_decoded(tiny_translator):
    translator = CountingTranslator(tiny_translator, max_tokens=8192)
    results = run_jobs(translator, [([s], options()) for s in SENTENCES], cancel=[1, 2])
    assert translator.calls == [[SENTENCES[0], SENTENCES[3]]]
    assert isinstance(results[1], asyncio.CancelledError) and results[3][0][0].text == tiny_translator.translate(SENTENCES[3])


def load_bench():
    """bench/serve.py, whose server launcher the tests share."""
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_server(model_dir, *flags):
    """`translator serve` in a subprocess on a free local port, its stderr kept; returns it and its URL once /health answers."""
    return load_bench().start_server(str(model_dir), *flags, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    process, url = start_server(tiny_model_dir)
    yield url
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)


def test_clients_that_disconnect_mid_request_do_not_take_the_server_down(server, tiny_translator):
    import httpx

    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"q": SENTENCES, **PAIR}).encode()
    head = f"POST /translate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    for sent in (head[:20], head + body[:10], head + body):  # in the headers, in the body, waiting for the answer
        with socket.create_connection((host, int(port))) as s:
            s.sendall(sent)
        time.sleep(0.1)
    answer = httpx.post(f"{server}/translate", json={"q": SENTENCES[0], **PAIR}, timeout=30)
    assert answer.status_code == 200 and answer.json()["translatedText"] == tiny_translator.translate(SENTENCES[0])


def test_sigterm_answers_the_requests_in_flight_then_exits(tiny_model_dir, tiny_translator):
    import httpx

    # A request reaching an idle server waits 2 s for company: SIGTERM arrives while it waits.
    process, url = start_server(tiny_model_dir, "--batch-wait-ms", "2000")
    answers = []
    client = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/translate", json={"q": SENTENCES, **PAIR}, timeout=60)))
    client.start()
    while httpx.get(f"{url}/health", timeout=5).json()["requests_in_progress"] == 0:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    client.join(timeout=60)
    _, stderr = process.communicate(timeout=60)
    assert answers and answers[0].status_code == 200, stderr
    assert answers[0].json()["translatedText"] == tiny_translator.translate(SENTENCES)
    assert process.returncode == 0, stderr


def children(pid: int) -> set[int]:
    return {int(p) for task in Path(f"/proc/{pid}/task").iterdir() for p in (task / "children").read_text().split()}


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc (Linux)")
def test_workers_decode_a_servers_batches_and_leave_with_it(tiny_model_dir, tiny_translator):
    import httpx

    process, url = start_server(tiny_model_dir, "--workers", "2")
    assert children(process.pid) == set()  # forked at the first batch of several sentences, not before
    answer = httpx.post(f"{url}/translate", json={"q": SENTENCES, **PAIR}, timeout=60)
    assert answer.status_code == 200 and answer.json()["translatedText"] == tiny_translator.translate(SENTENCES)
    workers = children(process.pid)
    assert len(workers) == 2
    again = httpx.post(f"{url}/translate", json={"q": SENTENCES[::-1], **PAIR}, timeout=60)
    assert again.json()["translatedText"] == tiny_translator.translate(SENTENCES[::-1])
    assert children(process.pid) == workers  # the same processes serve the next requests
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


def test_serve_command_errors(tiny_model_dir, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "translator", "serve", *args], capture_output=True, text=True, timeout=120)

    missing = run(str(tmp_path / "nope"))
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr
    assert run(str(tiny_model_dir), "--max-chars", "0").returncode == 2
    no_port = run(str(tiny_model_dir), "--port", "70000")
    assert no_port.returncode == 2 and "expected a port from 1 to 65535, got '70000'" in no_port.stderr and len(no_port.stderr) < 1000
    with socket.socket() as taken:  # a port in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = run(str(tiny_model_dir), "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 1 and "address already in use" in busy.stderr


@pytest.mark.parametrize("asked, expected", [("auto", "fp32"), ("bf16", "bf16")])
def test_serve_decodes_in_fp32_where_auto_would_pick_bf16_for_batches(tiny_model_dir, monkeypatch, capsys, asked, expected):
    import translator.devices
    import translator.serve
    from translator.cli import main

    monkeypatch.setattr(translator.devices, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    served = []
    monkeypatch.setattr(translator.serve, "serve", lambda translator, *rest: served.append(translator))
    assert main(["serve", str(tiny_model_dir), "--device", "cpu", "--precision", asked]) == 0
    assert served[0].precision().name == expected
    assert f"precision: {expected} (" in capsys.readouterr().err
    assert Translator.from_pretrained(tiny_model_dir, device="cpu").precision("auto").name == "bf16"  # the premise: auto picks bf16 elsewhere


def test_importing_translator_does_not_import_the_web_stack():
    code = "import sys, translator; print(any(m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_rerank_with_reranks_beam_searches_only(tiny_translator, reverse):
    weight = 50.0  # large enough to reorder some beams (tests/test_score.py)
    with TestClient(create_app(tiny_translator, reranking=Reranking(reverse, weight))) as reranking:
        beam = reranking.post("/translate", json={"q": SENTENCES, **PAIR, "beam_size": 4, "alternatives": 1}).json()
        greedy = reranking.post("/translate", json={"q": SENTENCES, **PAIR, "beam_size": 1}).json()
        drawn = reranking.post("/translate", json={"q": SENTENCES[0], **PAIR, "sampling": {"seed": 3}}).json()
    expected = tiny_translator.translate(SENTENCES, beam_size=4, n_best=2, rerank=reverse, rerank_weight=weight)
    assert beam["translatedText"] == [hyps[0].text for hyps in expected]
    assert beam["scores"] == [[round(h.score, 4) for h in hyps] for hyps in expected]
    assert beam["translatedText"] != tiny_translator.translate(SENTENCES, beam_size=4)  # the reranking changed some
    assert greedy["translatedText"] == tiny_translator.translate(SENTENCES, beam_size=1)
    assert drawn["translatedText"] == tiny_translator.translate(SENTENCES[0], sampling=Sampling(seed=3))


def test_the_app_refuses_decoding_settings_that_would_refuse_every_request(tiny_translator, reverse):
    recipe = tiny_translator.recipe
    too_wide = Translator(tiny_translator.model, tiny_translator.tokenizer, replace(recipe, decode=replace(recipe.decode, beam_size=40)))
    with pytest.raises(RecipeError, match="a request of the defaults would be refused: beam_size: got 40"):
        create_app(too_wide)
    with pytest.raises(RecipeError, match="rerank_weight: got -5"):
        create_app(tiny_translator, reranking=Reranking(reverse, weight=-5.0))
    create_app(tiny_translator, reranking=Reranking(reverse, weight=0.5))  # the premise: a good weight is taken


def test_serve_refuses_a_reranking_model_of_another_pair(tiny_model_dir):
    wrong = subprocess.run([sys.executable, "-m", "translator", "serve", str(tiny_model_dir), "--rerank-with", str(tiny_model_dir)],
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "the reranking model must translate en to de" in wrong.stderr and "Traceback" not in wrong.stderr
