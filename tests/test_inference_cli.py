"""Which decoder the inference CLIs run: tools/serve.py and tools/chat.py (long-lived) compile the decode step
at start-up by default on CPU, --no-compile keeps them eager; tools/generate.py (one-shot) is eager unless
asked. Wiring only: torch.compile is replaced by the identity here (the real compile is exercised by
test_server.py's server and test_fast_decode.py)."""
import os
import sys

import pytest

from inference_utils import make_checkpoint
from megatron_lite.inference import generate as generate_mod
from megatron_lite.inference.chat import stream_chat
from megatron_lite.inference.cli import load_for_inference, wants_compile
from megatron_lite.inference.fast_decode import CompiledDecoding, compiled_decoder_of
from megatron_lite.inference.generate import EagerDecoding

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import chat as chat_tool  # noqa: E402
import generate as generate_tool  # noqa: E402
import serve as serve_tool  # noqa: E402


@pytest.mark.parametrize("tool,flags,expected", [
    (serve_tool, [], True), (serve_tool, ["--no-compile"], False), (serve_tool, ["--device", "cuda"], False),
    (serve_tool, ["--device", "cuda", "--compile"], True),
    (chat_tool, [], True), (chat_tool, ["--no-compile"], False),
    (generate_tool, ["--prompt", "x"], False), (generate_tool, ["--prompt", "x", "--compile"], True),
])
def test_compile_defaults(tool, flags, expected):
    assert wants_compile(tool.build_parser().parse_args(["--load", "ckpt", *flags])) is expected


def test_serve_no_compile_loads_eager(tmp_path):
    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt")
    model, _ = load_for_inference(serve_tool.build_parser().parse_args(["--load", str(ckpt), "--no-compile"]))
    assert compiled_decoder_of(model) is None


@pytest.mark.parametrize("flags,decoding", [([], CompiledDecoding), (["--no-compile"], EagerDecoding)],
                         ids=["default", "no-compile"])
def test_chat_cli_decoder_and_tokens(tmp_path, monkeypatch, capsys, flags, decoding):
    from megatron_lite.inference import fast_decode
    ckpt, plain, tok = make_checkpoint(tmp_path / "ckpt", moe=True)
    monkeypatch.setattr(fast_decode.torch, "compile", lambda module, **kw: module)
    used = []
    start = generate_mod.start_decoding
    monkeypatch.setattr(generate_mod, "start_decoding", lambda *a: used.append(start(*a)) or used[-1])
    lines = iter(["Hello world", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    chat_tool.main(["--load", str(ckpt), "--temperature", "0", "--max-new-tokens", "12", *flags])
    out = capsys.readouterr().out
    assert len(used) == 1 and type(used[0]) is decoding  # the one reply ran on that decoder
    expected = "".join(e.text for e in stream_chat(plain, tok, [{"role": "user", "content": "Hello world"}],
                                                   max_new_tokens=12, greedy=True))
    assert expected.strip() and out == f"assistant> {expected}\n"
