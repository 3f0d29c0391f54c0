"""Streamlit chat with a megatron_lite checkpoint (dense or MoE) or an HF Llama/Mixtral folder.

    streamlit run megatron_lite/app/chat_app.py -- --load CKPT [--tag TAG] [--device cuda] [--dtype bfloat16] [--no-compile]

The model path may also come from the MEGATRON_LITE_LOAD environment variable or the sidebar. On CPU the
decode step is compiled once when the model loads (a minute or more on 2 cores, then about twice the eager
speed); the sidebar's "Compiled decoding" toggle, --no-compile or MEGATRON_LITE_COMPILE=0 turn that off.
Multi-turn: the whole history (after the system prompt) is re-sent each turn, oldest turns dropped once it
no longer fits the context limit. Replies stream token by token.
"""
from __future__ import annotations

import argparse
import os
import sys

import streamlit as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_lite.errors import UserError  # noqa: E402
from megatron_lite.inference.chat import stream_chat  # noqa: E402
from megatron_lite.inference.generate import SamplingParams  # noqa: E402

TITLE = "megatron_lite chat"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="chat_app", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", default=os.environ.get("MEGATRON_LITE_LOAD", ""),
                    help="checkpoint folder or HF folder (default: $MEGATRON_LITE_LOAD)")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: CKPT/latest)")
    ap.add_argument("--device", default=None, help="initial device choice (cpu, cuda)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="initial dtype")
    env = os.environ.get("MEGATRON_LITE_COMPILE")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction,
                    default=None if env is None else env.strip().lower() not in ("0", "false", "no", "off"),
                    help="initial state of the 'Compiled decoding' toggle (default: $MEGATRON_LITE_COMPILE, "
                         "else on for the CPU, off on GPUs)")
    args, _unknown = ap.parse_known_args(argv)  # Streamlit (and test runners) may leave their own args
    return args


# One model at a time: trying another path or dtype must not keep every earlier model in (GPU) memory.
@st.cache_resource(show_spinner=False, max_entries=1)
def get_model(path: str, tag: str | None, device: str, dtype: str, compiled: bool = False):
    """The model laid out for decoding; `compiled`: with its batch-1 decode step compiled now, so that the
    first reply does not wait for it."""
    import contextlib

    from megatron_lite.inference.fast_decode import compile_decoder, use_decode_layout
    from megatron_lite.inference.loading import load_model
    with contextlib.redirect_stdout(sys.stderr):
        model, tokenizer = load_model(path, device, dtype, tag=tag)
    if not compiled:
        return use_decode_layout(model), tokenizer
    compile_decoder(model).compiled_decoder.warm_up(batch_size=1)
    return model, tokenizer


def model_controls(args):
    """The sidebar's first block: which model, where, in which dtype."""
    import torch

    sb = st.sidebar
    path = sb.text_input("Checkpoint or HF folder", value=args.load, key="load")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    device = sb.selectbox("Device", devices, index=devices.index(args.device) if args.device in devices else 0)
    dtypes = ["float32", "bfloat16", "float16"]
    dtype = sb.selectbox("Dtype", dtypes, index=dtypes.index(args.dtype) if args.dtype else 0,
                         help="bfloat16/float16 are for GPUs; CPUs are fastest in float32")
    compiled = sb.toggle("Compiled decoding", value=args.compile if args.compile is not None else device == "cpu",
                         help="Run each decode step as one torch.compile'd graph: about twice as fast on CPUs, "
                              "after a one-off compile when the model loads (a minute or more on 2 cores). "
                              "Tuned for CPUs: off by default on GPUs.")
    return path.strip(), device, dtype, compiled


def sampling_controls(max_seq_len: int):
    """The sidebar's second block, bounded by the loaded model's context window."""
    sb = st.sidebar
    # Prompt and reply share the window, so a reply can never be longer than it.
    most = max(1, max_seq_len - 1)
    max_new = sb.slider("Max new tokens", 1, most, min(256, max(1, max_seq_len // 2)),
                        help=f"At most the model's context of {max_seq_len} tokens, shared with the prompt: "
                             "the oldest turns are dropped to leave room for the reply.")
    temperature = sb.slider("Temperature (0 = greedy)", 0.0, 2.0, 0.7, 0.05)
    top_k = sb.number_input("Top-k (0 = off)", 0, 100000, 0)
    top_p = sb.slider("Top-p", 0.05, 1.0, 0.9, 0.05)
    seed = sb.number_input("Seed (-1 = random)", -1, 2**31 - 1, -1)
    context = sb.number_input("Context limit (tokens, 0 = model max)", 0, max_seq_len, 0,
                              help=f"The model's context is {max_seq_len} tokens.")
    system = sb.text_area("System prompt", value="You are a helpful assistant.")
    if sb.button("Clear history"):
        st.session_state.messages = []
    params = SamplingParams(max_new_tokens=int(max_new), temperature=float(temperature), top_k=int(top_k),
                            top_p=float(top_p), seed=None if seed < 0 else int(seed))
    return params, int(context) or None, system


def show_message(role: str, content: str):
    with st.chat_message(role):
        # What the user typed is shown as typed ("# x" stays "# x"); replies may use Markdown.
        if role == "user":
            st.text(content)
        else:
            st.markdown(content)


def chat_turn(model, tokenizer, params, context: int | None, system: str):
    """Show the history; on a new message, stream the reply and add both to the history."""
    history = st.session_state.setdefault("messages", [])
    hint = st.empty()
    if not history:
        hint.info("Type a message below to start. Sampling settings and Clear history are in the sidebar.")
    for m in history:
        show_message(m["role"], m["content"])
    prompt = st.chat_input("Message")
    if not prompt:
        return
    hint.empty()
    history.append({"role": "user", "content": prompt})
    show_message("user", prompt)
    conversation = ([{"role": "system", "content": system}] if system.strip() else []) + history
    with st.chat_message("assistant"):
        try:
            deltas = (ev.text for ev in stream_chat(model, tokenizer, conversation, params, context_limit=context))
            reply = st.write_stream(deltas)
        except UserError as e:
            st.error(str(e))
            history.pop()
            return
    history.append({"role": "assistant", "content": reply if isinstance(reply, str) else "".join(map(str, reply))})


def model_caption(path: str, model, device: str, dtype: str) -> str:
    cfg = model.config
    kind = "MoE" if cfg.is_moe else "dense"
    return (f"{os.path.basename(os.path.normpath(path))} · {kind} · {cfg.num_params() / 1e6:.1f}M params · "
            f"context {cfg.max_seq_len} · {device} {dtype}")


def main():
    st.set_page_config(page_title=TITLE, page_icon="💬")
    st.title(TITLE)
    args = parse_args(sys.argv[1:])
    path, device, dtype, compiled = model_controls(args)
    if not path:
        st.info("Enter a checkpoint folder or an HF model folder in the sidebar to start chatting.")
        return
    try:
        with st.spinner("Loading model and compiling its decode step (once; a minute or more on CPU)..."
                        if compiled else "Loading model..."):
            model, tokenizer = get_model(path, args.tag, device, dtype, compiled)
    except UserError as e:
        st.error(str(e))
        return
    st.caption(model_caption(path, model, device, dtype))
    params, context, system = sampling_controls(model.config.max_seq_len)
    chat_turn(model, tokenizer, params, context, system)


main()
