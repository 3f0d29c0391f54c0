"""Streamlit chat app through Streamlit's own AppTest: a message in, the assistant's reply rendered."""
import os

import pytest
from streamlit.testing.v1 import AppTest

from inference_utils import make_checkpoint
from megatron_lite.inference.loading import load_model
from megatron_lite.inference.chat import chat

APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_lite", "app", "chat_app.py")


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_message_in_reply_rendered(tmp_path, monkeypatch, moe):
    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt", moe=moe)
    monkeypatch.setenv("MEGATRON_LITE_LOAD", str(ckpt))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception and not at.error
    at.sidebar.slider[0].set_value(12)  # max new tokens
    at.sidebar.slider[1].set_value(0.0)  # temperature 0 = greedy, so the reply is known
    at.sidebar.text_area[0].set_value("Be brief.")
    at.run()
    at.chat_input[0].set_value("Hello world").run()
    assert not at.exception and not at.error
    roles = [m.name for m in at.chat_message]
    assert roles == ["user", "assistant"]
    assert at.chat_message[0].markdown[0].value == "Hello world"

    model, tok = load_model(ckpt)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    expected = chat(model, tok, [conv], max_new_tokens=12, greedy=True)[0].text
    assert expected.strip()
    assert at.chat_message[1].markdown[0].value.strip() == expected.strip()

    # A second turn keeps the history; clearing empties it.
    at.chat_input[0].set_value("The quick brown fox").run()
    assert [m.name for m in at.chat_message] == ["user", "assistant", "user", "assistant"]
    at.sidebar.button[0].click().run()
    assert len(at.chat_message) == 0
