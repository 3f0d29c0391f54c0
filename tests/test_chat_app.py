"""Streamlit chat app through Streamlit's own AppTest: a message in, the assistant's reply rendered, and what
a user sees around it (title, hints, the model caption, bounded controls, one-line errors, one cached model).
A real-browser round trip is in test_chat_app_browser.py."""
import gc
import os

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from inference_utils import make_checkpoint
from megatron_lite.inference.loading import load_model
from megatron_lite.inference.chat import chat
from megatron_lite.model.gpt import GPT

APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_lite", "app", "chat_app.py")


def start_app(monkeypatch, load="", compiled="0"):
    st.cache_resource.clear()  # no model left over from another test
    monkeypatch.setenv("MEGATRON_LITE_LOAD", str(load))
    # eager unless a test asks: a compile takes a minute on 2 cores (the compiled path: test_fast_decode.py)
    if compiled is None:
        monkeypatch.delenv("MEGATRON_LITE_COMPILE", raising=False)
    else:
        monkeypatch.setenv("MEGATRON_LITE_COMPILE", compiled)
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception
    return at


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_message_in_reply_rendered(tmp_path, monkeypatch, moe):
    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt", moe=moe)
    at = start_app(monkeypatch, ckpt)
    assert not at.error
    assert at.main.title[0].value == "megatron_lite chat"
    assert "Type a message" in at.main.info[0].value  # the empty first page says what to do
    at.sidebar.slider[0].set_value(12)  # max new tokens
    at.sidebar.slider[1].set_value(0.0)  # temperature 0 = greedy, so the reply is known
    at.sidebar.text_area[0].set_value("Be brief.")
    at.run()
    message = "# Hello *world*"  # Markdown syntax: must be shown as typed, not as a heading
    at.chat_input[0].set_value(message).run()
    assert not at.exception and not at.error
    roles = [m.name for m in at.chat_message]
    assert roles == ["user", "assistant"]
    user = at.chat_message[0]
    assert [t.value for t in user.text] == [message] and len(user.markdown) == 0
    assert len(at.main.info) == 0  # the hint is gone once the chat has started

    model, tok = load_model(ckpt)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": message}]
    expected = chat(model, tok, [conv], max_new_tokens=12, greedy=True)[0].text
    assert expected.strip()
    assert at.chat_message[1].markdown[0].value.strip() == expected.strip()

    # A second turn keeps the history; clearing empties it.
    at.chat_input[0].set_value("The quick brown fox").run()
    assert [m.name for m in at.chat_message] == ["user", "assistant", "user", "assistant"]
    assert at.chat_message[0].text[0].value == message  # re-rendered from history, still plain text
    at.sidebar.button[0].click().run()
    assert len(at.chat_message) == 0


def test_first_page_caption_and_bounded_controls(tmp_path, monkeypatch):
    at = start_app(monkeypatch, "")
    assert not at.error
    assert at.main.title[0].value == "megatron_lite chat"
    assert "checkpoint folder" in at.main.info[0].value and "sidebar" in at.main.info[0].value

    ckpt, model, _ = make_checkpoint(tmp_path / "ckpt", max_seq_len=96)
    at.sidebar.text_input[0].set_value(str(ckpt)).run()
    assert not at.exception and not at.error
    # The caption is on the main page right under the title, not at the bottom of the sidebar.
    assert len(at.sidebar.caption) == 0
    caption = at.main.caption[0].value
    assert caption == f"ckpt · dense · {model.config.num_params() / 1e6:.1f}M params · context 96 · cpu float32"
    max_new = at.sidebar.slider[0]
    assert (max_new.label, max_new.min, max_new.max, max_new.value) == ("Max new tokens", 1, 95, 48)
    assert "96 tokens" in max_new.help
    context = at.sidebar.number_input[2]
    assert context.label.startswith("Context limit") and context.max == 96


def test_bad_paths_one_line_without_flags(tmp_path, monkeypatch):
    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt")
    at = start_app(monkeypatch, ckpt / "model_config.json")
    # A file: said so, and the folder to use instead.
    assert [e.value for e in at.error] == [f"{ckpt / 'model_config.json'} is a file, not a folder; give the "
                                          f"checkpoint or HF folder, e.g. {ckpt}"]
    assert len(at.chat_input) == 0

    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("hello")
    at.sidebar.text_input[0].set_value(str(other)).run()
    (err,) = at.error
    assert "not a megatron_lite checkpoint folder" in err.value and "--" not in err.value  # no CLI flag

    # No 'latest' (a save that never finished naming one): point at a checkpoint it holds, which then loads.
    (ckpt / "latest").unlink()
    at.sidebar.text_input[0].set_value(str(ckpt)).run()
    (err,) = at.error
    assert err.value.endswith(f"give one of its checkpoints, e.g. {ckpt / 'global_step7'}") and "--" not in err.value
    at.sidebar.text_input[0].set_value(str(ckpt / "global_step7")).run()
    assert not at.exception and not at.error
    assert "context 128" in at.main.caption[0].value and len(at.chat_input) == 1


def test_one_model_cached(tmp_path, monkeypatch):
    """Switching dtype (or path) replaces the cached model instead of keeping every one loaded."""
    # type(), not isinstance(): torch.compile leaves weak proxies in gc's list, and isinstance() on a dead one raises
    before = [o for o in gc.get_objects() if type(o) is GPT]
    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt")
    at = start_app(monkeypatch, ckpt)
    for dtype in ("bfloat16", "float16"):
        at.sidebar.selectbox[1].set_value(dtype).run()
        assert not at.exception and not at.error
        assert at.main.caption[0].value.endswith(f"cpu {dtype}")
    gc.collect()
    live = [o for o in gc.get_objects() if type(o) is GPT and not any(o is b for b in before)]
    assert len(live) == 1 and next(live[0].parameters()).dtype == torch.float16


@pytest.mark.parametrize("env,expected", [(None, True), ("0", False)])
def test_compiled_decoding_toggle_defaults_on_for_cpu(monkeypatch, env, expected):
    at = start_app(monkeypatch, "", compiled=env)  # no model loaded: nothing compiles here
    (toggle,) = at.sidebar.toggle
    assert toggle.label == "Compiled decoding" and toggle.value is expected and "CPU" in toggle.help
