"""OpenAI-compatible server driven by the official `openai` client, plus bad requests and concurrency.

The server holds the model as `tools/serve.py --load CKPT` prepares it with default flags (on CPU: the decode
step compiled and warmed up at start-up), and its greedy tokens must be the plain eager model's."""
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from inference_utils import make_checkpoint
from megatron_lite.inference.chat import chat
from megatron_lite.inference.cli import load_for_inference
from megatron_lite.inference.fast_decode import compiled_decoder_of
from megatron_lite.inference.generate import generate
from megatron_lite.inference.server import Limits, create_app
from megatron_lite.parallel import free_port

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello world"}]
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import serve as serve_tool
    import uvicorn

    ckpt, plain, _ = make_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", moe=True, seed=5)
    model, tok = load_for_inference(serve_tool.build_parser().parse_args(["--load", str(ckpt)]))
    assert compiled_decoder_of(model).warmed_up == {1}  # compiled before the port opens
    app = create_app(model, tok, "tiny-moe", Limits(max_tokens=64, default_max_tokens=16, max_body_bytes=4096))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}", plain, tok  # the reference: the plain model, eager
    srv.should_exit = True
    t.join(10)


def client(url):
    from openai import OpenAI
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(url, path, data: bytes, headers=None):
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_endpoint(server):
    url, _, _ = server
    assert [m.id for m in client(url).models.list().data] == ["tiny-moe"]


def test_chat_completion_matches_library(server):
    url, model, tok = server
    r = client(url).chat.completions.create(model="tiny-moe", messages=MESSAGES, max_tokens=12, temperature=0)
    expected = chat(model, tok, [MESSAGES], max_new_tokens=12, greedy=True)[0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text and r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == expected.prompt_tokens and r.usage.completion_tokens == expected.completion_tokens


def test_chat_streaming_equals_non_streaming(server):
    url, _, _ = server
    c = client(url)
    full = c.chat.completions.create(model="tiny-moe", messages=MESSAGES, max_tokens=20, temperature=0.8, seed=7)
    chunks = list(c.chat.completions.create(model="tiny-moe", messages=MESSAGES, max_tokens=20, temperature=0.8,
                                            seed=7, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_sse_ends_with_done(server):
    url, _, _ = server
    body = json.dumps({"messages": MESSAGES, "max_tokens": 5, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.read().decode().split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_completions_endpoint(server):
    url, model, tok = server
    r = client(url).completions.create(model="tiny-moe", prompt="The quick brown", max_tokens=10, temperature=0)
    assert r.choices[0].text == generate(model, tok, ["The quick brown"], max_new_tokens=10, greedy=True)[0].text
    streamed = client(url).completions.create(model="tiny-moe", prompt="The quick brown", max_tokens=10,
                                              temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text


@pytest.mark.parametrize("body,param", [
    (b'{"messages": [', None),  # malformed JSON
    (b'{"model": "x"}', "messages"),  # missing messages
    (b'{"messages": []}', "messages"),
    (json.dumps({"messages": MESSAGES, "max_tokens": -5}).encode(), "max_tokens"),
    (json.dumps({"messages": MESSAGES, "max_tokens": 100000}).encode(), "max_tokens"),
    (json.dumps({"messages": MESSAGES, "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "messages[0].role"),
    (json.dumps({"messages": MESSAGES, "n": 3}).encode(), "n"),
    (json.dumps({"messages": [{"role": "user", "content": "hello " * 200}]}).encode(), "messages"),  # too long
    (b'[1, 2]', None),
])
def test_bad_requests_get_openai_errors(server, body, param):
    url, _, _ = server
    status, err = post(url, "/v1/chat/completions", body)
    assert status == 400
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
    assert err["error"]["param"] == param


def test_client_raises_bad_request(server):
    import openai
    url, _, _ = server
    with pytest.raises(openai.BadRequestError):
        client(url).chat.completions.create(model="tiny-moe", messages=MESSAGES, max_tokens=-1)


def test_oversized_body_and_unknown_path(server):
    url, _, _ = server
    status, err = post(url, "/v1/chat/completions", json.dumps({"messages": MESSAGES, "x": "y" * 10000}).encode())
    assert status == 413 and "error" in err
    status, err = post(url, "/v1/nope", b"{}")
    assert status == 404 and err["error"]["type"] == "not_found_error"


def test_concurrent_requests_do_not_mix(server):
    url, model, tok = server
    prompts = ["Hello world", "The quick brown fox", "你好", "def add(a, b):"]
    expected = {p: generate(model, tok, [p], max_new_tokens=12, greedy=True)[0].text for p in prompts}
    results, errors = {}, []

    def worker(p, stream):
        try:
            c = client(url)
            if stream:
                out = "".join(ch.choices[0].text for ch in c.completions.create(
                    model="m", prompt=p, max_tokens=12, temperature=0, stream=True))
            else:
                out = c.completions.create(model="m", prompt=p, max_tokens=12, temperature=0).choices[0].text
            results[(p, stream)] = out
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p, s)) for p in prompts for s in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert all(results[(p, s)] == expected[p] for p in prompts for s in (False, True))
