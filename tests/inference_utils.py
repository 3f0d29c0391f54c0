"""Tiny tokenizer, models and checkpoint folders for the inference / conversion / serving tests."""
from __future__ import annotations

import torch

from megatron_lite.checkpoint.save import save_checkpoint_folder
from megatron_lite.config import ModelConfig
from megatron_lite.model.gpt import GPT

CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "你好，世界。今天天气很好。",  # multi-byte characters: streaming must never split them
    "Emoji test: 🙂🚀✨ and café naïve résumé.",
    "def add(a, b):\n    return a + b\n",
] * 4


def make_tokenizer(out_dir=None):
    """Byte-level BPE with <unk>, <|im_start|>, <|im_end|> (= eos = pad) and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                 pad_token="<|im_end|>", bos_token="<|im_start|>", chat_template=CHATML,
                                 clean_up_tokenization_spaces=False)
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf


def tiny_config(moe: bool = False, **kw) -> ModelConfig:
    base = dict(vocab_size=384, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
                max_seq_len=128, name="test-tiny")
    if moe:
        base.update(num_experts=4, topk=2)
    return ModelConfig(**{**base, **kw})


def tiny_model(config: ModelConfig, seed: int = 0, scale: float = 8.0) -> GPT:
    """A random GPT whose logits are far from uniform (init_std * scale), so greedy paths are decisive
    and the router actually prefers experts."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(scale)
            else:  # norms: not exactly 1, so a swapped norm weight shows up in the logits
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def make_checkpoint(path, moe: bool = False, seed: int = 0, **kw):
    """A checkpoint folder in the DeepSpeed layout training writes; returns (path, model, tokenizer)."""
    config = tiny_config(moe, **kw)
    model = tiny_model(config, seed)
    tokenizer = make_tokenizer()
    save_checkpoint_folder(path, config, model.state_dict(), tokenizer, tag="global_step7")
    return path, model, tokenizer
