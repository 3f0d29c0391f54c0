"""Reading training checkpoints: DeepSpeed MoE expert files, tp=2 shards, numpy RNG client state, bad folders."""
import numpy as np
import pytest
import torch

from inference_utils import make_checkpoint, tiny_config, tiny_model
from megatron_lite.checkpoint_io import load_full_state_dict, load_model
from megatron_lite.errors import UserError
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
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


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
