"""peftlab serve: an OpenAI-compatible server over an adapter set, tested with the real openai client."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from peftlab.api import load_adapters, load_run
from peftlab.methods import LoRA, PrefixTuning, PromptTuning, PTuningV2

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import exported  # noqa: E402
from peftlab.serve import Batcher, Server, create_app  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["Review: a moving film\nVerdict:", "Review: dull\nVerdict:", "Funny and sharp", "an odd quiet drama"]


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory, tiny_llama):
    """The tiny Llama with a chat template in its tokenizer."""
    path = tmp_path_factory.mktemp("chat_llama") / "model"
    shutil.copytree(tiny_llama, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory, chat_llama):
    tmp = tmp_path_factory.mktemp("served")
    paths = {"sentiment": exported(tmp, "s", LoRA, chat_llama, seed=1, r=4, target_modules=["q_proj", "v_proj"]),
             "topics": exported(tmp, "t", LoRA, chat_llama, seed=2, r=2, target_modules=["v_proj"]),
             "prompt": exported(tmp, "p", PromptTuning, chat_llama, seed=3, num_virtual_tokens=3),
             "prefix": exported(tmp, "x", PrefixTuning, chat_llama, seed=4, num_virtual_tokens=3),
             "ptv2": exported(tmp, "v", PTuningV2, chat_llama, seed=5, num_virtual_tokens=2, prefix_hidden_size=8)}
    app = create_app(load_adapters(paths), max_batch_size=8, max_wait_ms=20)
    with Server(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        yield paths, server, client


def alone(path, text, max_new_tokens):
    return load_run(path).predict([text], max_new_tokens=max_new_tokens)[0]["generated"]


def test_concurrent_requests_over_several_adapters_get_what_each_adapter_gives_alone(served):
    paths, _, client = served
    jobs = [(name, prompt) for name in [*paths, "base"] for prompt in PROMPTS[:2]]

    def ask(job):
        return client.completions.create(model=job[0], prompt=job[1], max_tokens=5).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    runs = {name: load_run(path) for name, path in paths.items()}
    for (name, prompt), got in zip(jobs, answers):
        if name == "base":
            continue
        assert got == runs[name].predict([prompt], max_new_tokens=5)[0]["generated"], (name, prompt)
    assert len({a for (n, _), a in zip(jobs, answers) if n != "base"}) > 2  # the adapters answer differently
    models = [m.id for m in client.models.list().data]
    assert models == ["base", *paths]


def test_chat_uses_the_chat_template_and_streams(served):
    paths, _, client = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is it good?"}]
    reply = client.chat.completions.create(model="topics", messages=messages, max_tokens=4)
    run = load_run(paths["topics"])
    tok = run.module.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("assistant:")
    # the template writes its own <s>: the prompt is the template's tokens, no BOS added in front (as vLLM does)
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert run.encode([text], add_special_tokens=False)["input_ids"][0].tolist() == list(ids)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    expected = run.predict([text], raw=True, add_special_tokens=False, max_new_tokens=4)[0]["generated"]
    assert reply.choices[0].message.content == expected
    stream = client.chat.completions.create(model="topics", messages=messages, max_tokens=4, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == reply.choices[0].message.content
    chunks = client.completions.create(model="prompt", prompt=PROMPTS[0], max_tokens=3, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == alone(paths["prompt"], PROMPTS[0], 3)


def test_streams_arrive_token_by_token_and_equal_the_unstreamed_answer(served):
    paths, _, client = served
    for name in ("sentiment", "ptv2", "prefix"):  # ptv2: P-tuning v2's own decoding loop feeds the streamer too
        whole = client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=12).choices[0]
        chunks = list(client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=12, stream=True))
        pieces = [c.choices[0].text for c in chunks if c.choices[0].text]
        assert "".join(pieces) == whole.text == alone(paths[name], PROMPTS[2], 12)
        assert 1 < len(pieces) <= 12  # events as tokens are decoded (at most one per token), not one at the end
        assert chunks[-1].choices[0].finish_reason == whole.finish_reason and chunks[-1].choices[0].text == ""
    for start in range(1, 8):  # stop strings across piece boundaries: nothing of one is ever sent
        stop = whole.text[start:start + 3]
        stopped = list(client.completions.create(model="prefix", prompt=PROMPTS[2], max_tokens=12, stream=True,
                                                 stop=[stop]))
        assert "".join(c.choices[0].text for c in stopped) == whole.text[:whole.text.index(stop)], stop
        assert stopped[-1].choices[0].finish_reason == "stop"
    near = list(client.completions.create(model="prefix", prompt=PROMPTS[2], max_tokens=12, stream=True,
                                          stop=[whole.text[3:5] + "\u2603"]))  # starts like the text, never matches
    assert "".join(c.choices[0].text for c in near) == whole.text


def test_sampling_with_a_seed_equals_the_adapter_alone_with_that_seed(served):
    paths, _, client = served

    def ask(seed):
        return client.completions.create(model="topics", prompt=PROMPTS[0], max_tokens=6, temperature=1.0,
                                         seed=seed).choices[0].text

    with ThreadPoolExecutor(4) as pool:  # concurrent: a seeded request runs alone, whoever else is queued
        answers = list(pool.map(ask, [11, 11, 12, 12]))
    want = {seed: load_run(paths["topics"]).predict([PROMPTS[0]], max_new_tokens=6, do_sample=True, temperature=1.0,
                                                    top_p=1.0, top_k=0, seed=seed)[0]["generated"] for seed in (11, 12)}
    assert answers == [want[11], want[11], want[12], want[12]]
    assert want[11] != want[12] != alone(paths["topics"], PROMPTS[0], 6)  # it samples


def test_bad_requests_get_a_4xx_with_one_line_and_the_server_keeps_serving(served):
    paths, server, client = served
    with pytest.raises(openai.NotFoundError, match="the model 'nope' does not exist; this server has: base, "):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="the prompt has .* tokens and max_tokens is 8: more than the 256"):
        client.completions.create(model="sentiment", prompt="word " * 300, max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="top_p needs sampling: set temperature > 0"):
        client.completions.create(model="sentiment", prompt="hi", max_tokens=2, top_p=0.5)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model="sentiment", prompt="hi", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="stream: true takes one prompt"):
        client.completions.create(model="sentiment", prompt=["a", "b"], max_tokens=2, stream=True)
    with pytest.raises(openai.BadRequestError, match="logprobs: Extra inputs are not permitted"):
        client.completions.create(model="sentiment", prompt="hi", max_tokens=2, logprobs=2)
    raw = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    raw = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"})
    assert raw.status_code == 400 and raw.json()["error"]["message"] == "malformed request: model: Field required"
    # a client that goes away mid-stream
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"model": "prefix", "prompt": PROMPTS[1], "max_tokens": 3, "stream": True}) as response:
        assert response.status_code == 200
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "adapters": list(paths)}
    got = client.completions.create(model="prefix", prompt=PROMPTS[1], max_tokens=3).choices[0].text
    assert got == alone(paths["prefix"], PROMPTS[1], 3)


def test_requests_that_arrive_together_run_as_one_mixed_batch(served):
    paths, _, _ = served
    adapters = load_adapters({"sentiment": paths["sentiment"], "prompt": paths["prompt"]})
    names = ["sentiment", "prompt", "base", "sentiment", "prompt"]

    async def scenario():
        batcher = Batcher(adapters, max_batch_size=4, max_wait_ms=1, max_queue=8)
        futures = [batcher.submit(name, PROMPTS[i % 4], 3) for i, name in enumerate(names)]
        worker = asyncio.create_task(batcher.run())
        results = await asyncio.gather(*futures)
        worker.cancel()
        return batcher.batches, results

    batches, results = asyncio.run(scenario())
    assert batches == [4, 1]  # the bound, then the rest
    expected = [adapters.predict([PROMPTS[i % 4]], adapter=n, max_new_tokens=3)[0] for i, n in enumerate(names)]
    assert results == expected


def test_classification_endpoint(tmp_path, tiny_bert):
    path = exported(tmp_path, "c", LoRA, tiny_bert, "classification", 1, ["rotten", "fresh"], r=2)
    with Server(create_app(load_adapters({"reviews": path}))) as server:
        texts = ["A moving film.", "Dull."]
        body = httpx.post(server.url + "/v1/classify", json={"model": "reviews", "input": texts}).json()
        want = load_run(path).predict(texts)
        assert [d["label"] for d in body["data"]] == [w["label"] for w in want]
        for d, w in zip(body["data"], want):
            assert max(abs(d["probs"][k] - w["probs"][k]) for k in w["probs"]) < 1e-5
        wrong = httpx.post(server.url + "/v1/completions", json={"model": "reviews", "prompt": "hi"})
        assert wrong.status_code == 400 and "POST /v1/classify" in wrong.json()["error"]["message"]


def test_serve_command_refuses_a_bad_adapter_argument(capsys):
    from conftest import run_main

    code, out, err = run_main(["serve", "sentiment"], capsys)
    assert code != 0 and "adapter 'sentiment': give NAME=PATH" in out + err


def test_a_chat_trained_run_is_served_in_its_own_chat_template(tmp_path, tiny_chat_llama, capsys):
    """/v1/chat/completions on a data.task chat run answers as Run.chat does (the run's template and system
    prompt), not through the tokenizer's template alone."""
    from conftest import chat_rows, run_main, write_config, write_jsonl

    source = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    cfg = write_config(tmp_path, tiny_chat_llama, source, trainer={"max_steps": 2},
                       data={"task": "chat", "max_length": 256, "system_prompt": "Be brief."},
                       model={"target_modules": ["q_proj"]})
    code, _, err = run_main(["fit", "--config", cfg, "--test_after_fit", "false"], capsys)
    assert code == 0, err
    run_dir = str(next((tmp_path / "runs").rglob("version_*")))
    messages = [{"role": "user", "content": "Fresh or rotten? A superb film."}]
    run = load_run(run_dir)
    expected = run.chat(messages, max_new_tokens=6)
    # the tokenizer's template alone (no system prompt) answers otherwise, so the equality below tells them apart
    bare = run.module.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert run.predict([bare], raw=True, max_new_tokens=6)[0]["generated"] != expected
    with Server(create_app(load_adapters({"chat": run_dir}), max_batch_size=4, max_wait_ms=5)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=6)
    assert reply.choices[0].message.content == expected


def test_a_stream_stops_generating_when_its_client_goes_away_or_its_stop_string_arrives(served):
    """The worker is not held for a stream nobody reads: the streamer ends generate() at the next token."""
    from peftlab.serve import _Stream

    paths, server, client = served
    batcher = server.server.config.app.state.batcher
    whole = client.completions.create(model="sentiment", prompt=PROMPTS[2], max_tokens=200).choices[0]
    assert whole.finish_reason == "length"  # no end-of-text token: generating to the end takes all 200 tokens

    class Immediately:  # the worker's loop.call_soon_threadsafe, run at once, so the test needs no timing
        def call_soon_threadsafe(self, f, *args):
            f(*args)

    stream = _Stream()
    pushed = []
    stream.pieces.put_nowait = lambda piece: (pushed.append(piece), stream.cancelled.set())  # gone after one piece
    result = batcher._stream(("sentiment", PROMPTS[2], (200, True, None, ()), None, stream), Immediately())
    first = pushed[0]
    assert pushed == [first, None] and result == {"generated": first} and whole.text.startswith(first)
    assert batcher.streamed[-1] < 5  # the tokens up to the first piece, not 200

    # through HTTP: a stop string that arrives early, then a client that reads one event and disconnects
    stop = whole.text[2:5]
    before = len(batcher.streamed)
    chunks = list(client.completions.create(model="sentiment", prompt=PROMPTS[2], max_tokens=200, stream=True,
                                            stop=[stop]))
    assert "".join(c.choices[0].text for c in chunks) == whole.text[:whole.text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": "sentiment", "prompt": PROMPTS[2],
                                                                     "max_tokens": 200, "stream": True}) as response:
        next(response.iter_lines())
    for _ in range(500):  # the worker records a generation when it has ended
        if len(batcher.streamed) == before + 2:
            break
        time.sleep(0.01)
    stopped, gone = batcher.streamed[before:]
    assert stopped < 200 and gone < 200, (stopped, gone)  # measured: 3 and 1; how soon depends on the threads
    assert client.completions.create(model="sentiment", prompt=PROMPTS[2], max_tokens=200).choices[0].text == whole.text


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_stream_pieces_join_to_the_whole_answer(kind, tokenizer_dir):
    """Each token is decoded with its context only (not the whole answer again), and the pieces still join to
    exactly the decoded answer: multi-byte characters split over tokens and SentencePiece's word-leading spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from peftlab.serve import _Pieces

    text = "Fresh: a café in 東京, mostly 🎬 and  two spaces. Rotten? no"
    if kind == "byte-level":
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        raw = Tokenizer(models.BPE(unk_token="<unk>"))
        raw.pre_tokenizer, raw.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        raw.train_from_iterator([text, "a fresh film", "rotten"],
                                trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = []
    streamer = _Pieces(tok, pieces.append)
    streamer.put(torch.tensor([[0]]))  # the prompt, skipped
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert len(pieces) > len(ids) // 2  # token by token, not held back
