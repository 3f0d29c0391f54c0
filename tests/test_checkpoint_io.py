"""Reading training checkpoints: DeepSpeed MoE expert files, tp=2 shards, numpy RNG client state, bad folders."""
import numpy as np
import pytest
import torch

from inference_utils import make_checkpoint, tiny_config, tiny_model
from megatron_lite.checkpoint.load import load_full_state_dict
from megatron_lite.errors import UserError
from megatron_lite.inference.generate import use_cpu_decode_layout
from megatron_lite.inference.loading import load_model
from megatron_lite.tensor_parallel.reshard import shard_state_dict, tp_shard_specs


def test_moe_experts_come_from_their_own_files(tmp_path):
    ckpt, model, _ = make_checkpoint(tmp_path / "ckpt", moe=True)
    main = torch.load(ckpt / "global_step7" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert not any("deepspeed_experts" in k for k in main)  # as DeepSpeed writes it
    config, sd = load_full_state_dict(ckpt)
    assert config.is_moe and sd.keys() == model.state_dict().keys()
    (ckpt / "global_step7" / "layer_1_expert_2_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(UserError, match="expert files"):
        load_full_state_dict(ckpt)


def test_tp2_shards_are_gathered(tmp_path):
    config = tiny_config()
    model = tiny_model(config)
    full = model.state_dict()
    specs = tp_shard_specs(model)
    assert specs  # the model tags its tensor-parallel weights
    ckpt = tmp_path / "ckpt"
    (ckpt / "global_step3").mkdir(parents=True)
    for r in range(2):
        shard = shard_state_dict(full, specs, r, 2)
        # a numpy RNG state in the client state, as older training checkpoints stored it
        torch.save({"module": shard, "rng": {"numpy": np.random.get_state()}},
                   ckpt / "global_step3" / f"mp_rank_{r:02d}_model_states.pt")
    (ckpt / "latest").write_text("global_step3")
    config.save(ckpt / "model_config.json")
    loaded, _ = load_model(ckpt, require_tokenizer=False)
    got = loaded.state_dict()
    assert all(torch.equal(got[name], w) for name, w in full.items()) and got.keys() == full.keys()
    # load_model lays CPU weights out for decoding (fused, column-major GEMMs round differently), so the
    # logits are compared with the reference in that same layout
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, use_cpu_decode_layout(model)(ids).logits)


def test_bad_folders_give_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="latest"):
        load_model(tmp_path / "empty")
    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt")
    (ckpt / "global_step7" / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_model(ckpt)


DS_LOAD = r'''
import os, sys, torch
import deepspeed
from megatron_lite.ds_runtime import skip_shm_comm_build
from megatron_lite.config import ModelConfig
from megatron_lite.model.gpt import GPT
from megatron_lite.checkpoint.load import load_full_state_dict
skip_shm_comm_build()
path = sys.argv[1]
torch.manual_seed(123)
model = GPT(ModelConfig.load(path))
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
tag = open(os.path.join(path, "latest")).read().strip()
loaded, _ = engine.load_checkpoint(path, tag=tag, load_module_only=True, load_optimizer_states=False,
                                   load_lr_scheduler_states=False)
assert loaded is not None
_, sd = load_full_state_dict(path)
got = engine.module.state_dict()
assert sd.keys() == got.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
print("DS-LOAD-OK")
'''


def test_written_checkpoint_loads_in_deepspeed(tmp_path):
    """What convert_from_hf writes is a checkpoint DeepSpeed itself restores (SFT --pretrained from HF)."""
    import os
    import socket
    import subprocess
    import sys

    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt", moe=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", DS_LOAD, str(ckpt)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert "DS-LOAD-OK" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
