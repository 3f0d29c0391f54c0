"""Checkpoint folders: DeepSpeed MoE expert files, tp=2 shards, numpy RNG client state, bad folders; the
expert key, the atomic writers, the one pickle policy."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from inference_utils import make_checkpoint, tiny_config, tiny_model
from megatron_lite.checkpoint.load import load_full_state_dict
from megatron_lite.errors import UserError
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
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():  # load_model returns the plain model: the very same logits
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
    import subprocess
    import sys

    from megatron_lite.parallel import free_port

    ckpt, _, _ = make_checkpoint(tmp_path / "ckpt", moe=True)
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", DS_LOAD, str(ckpt)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert "DS-LOAD-OK" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


# ------------------------------------------------------------------------------------------ layout and writers

def test_expert_key_is_the_one_spelling_of_expert_weights():
    from megatron_lite.checkpoint.layout import EXPERT_KEY, expert_key

    sd = tiny_model(tiny_config(moe=True)).state_dict()
    experts = {k: m for k in sd if (m := EXPERT_KEY.match(k))}
    assert len({(m["layer"], m["expert"]) for m in experts.values()}) == 2 * 4  # layers x experts
    assert all(expert_key(m["layer"], m["expert"], m["param"]) == k for k, m in experts.items())
    assert all("deepspeed_experts" not in k for k in sd.keys() - experts.keys())


def test_weights_folder_writer_commits_atomically(tmp_path):
    """save_checkpoint_folder writes under tmp-<tag> and only then replaces <tag> and `latest`: a writer that
    dies half way leaves the previous checkpoint readable, and a rewrite leaves no debris."""
    from megatron_lite.checkpoint.save import save_checkpoint_folder

    config = tiny_config()
    first = tiny_model(config, seed=1).state_dict()
    save_checkpoint_folder(tmp_path, config, first, tag="a")

    class DiesWhileSaving:
        def save_pretrained(self, path):
            raise KeyboardInterrupt  # killed after the weights, before the commit

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_folder(tmp_path, config, tiny_model(config, seed=2).state_dict(), DiesWhileSaving(), tag="b")
    assert (tmp_path / "latest").read_text() == "a" and not (tmp_path / "b").exists()
    _, sd = load_full_state_dict(tmp_path)
    assert all(torch.equal(sd[k], v) for k, v in first.items())
    second = tiny_model(config, seed=3).state_dict()
    save_checkpoint_folder(tmp_path, config, second, tag="a")
    _, sd = load_full_state_dict(tmp_path)
    assert all(torch.equal(sd[k], v) for k, v in second.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "latest", "model_config.json", "tmp-b"]
    save_checkpoint_folder(tmp_path, config, second, tag="b")  # the debris of the failed save is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "latest", "model_config.json"]


def test_before_commit_sees_the_complete_temporary_folder(tmp_path):
    from megatron_lite.checkpoint.save import save_training_checkpoint

    class Engine:
        device = torch.device("cpu")

        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            (Path(save_dir) / tag).mkdir(parents=True)
            torch.save({"module": {}, "it": client_state["it"]}, Path(save_dir) / tag / "mp_rank_00_model_states.pt")

    seen = []

    def before_commit(tmp_dir):
        seen.append((tmp_dir.name, sorted(p.name for p in tmp_dir.iterdir()), (tmp_path / "latest").read_text()))

    save_training_checkpoint(Engine(), str(tmp_path), 1, {"it": 1})
    assert save_training_checkpoint(Engine(), str(tmp_path), 2, {"it": 2}, before_commit=before_commit) == "global_step2"
    assert seen == [("tmp-global_step2", ["mp_rank_00_model_states.pt"], "global_step1")]
    assert (tmp_path / "latest").read_text() == "global_step2" and not (tmp_path / "tmp-global_step2").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_one_pickle_policy_for_loading_and_scanning(tmp_path):
    """Plain numpy data and DeepSpeed classes are admitted by the weights-only loader and by the scan that
    runs before DeepSpeed unpickles a folder; a function such as os.system by neither."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from megatron_lite.checkpoint.layout import check_pickle_globals, load_weights_only

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    torch.save({"rng": np.random.get_state(), "stage": ZeroStageEnum(2)}, good / "x.pt")
    torch.save({"payload": _Evil()}, bad / "x.pt")
    state = load_weights_only(good / "x.pt")
    assert state["stage"] == ZeroStageEnum(2) and np.array_equal(state["rng"][1], np.random.get_state()[1])
    check_pickle_globals(good)
    with pytest.raises(UserError, match="cannot read .* unsafe globals .*system"):
        load_weights_only(bad / "x.pt")
    with pytest.raises(UserError, match="system, which loading would execute; refusing"):
        check_pickle_globals(bad)


# ------------------------------------------------------------------------------------------ requeue, bad input, full disk

def test_resolve_load_is_a_fresh_start_only_for_the_save_folder_without_checkpoint(tmp_path):
    from megatron_lite.checkpoint.load import resolve_load

    ck, other = tmp_path / "ckpt", tmp_path / "other"
    load, note = resolve_load(str(ck), str(ck) + "/")  # not there yet, spelled differently: the same folder
    assert load is None and note == f"--load {ck}: no checkpoint there yet (it is the --save folder): starting from scratch"
    ck.mkdir()
    (ck / "tmp-global_step4").mkdir()  # killed during its first save: still nothing to resume
    assert resolve_load(str(ck), str(ck))[0] is None
    assert resolve_load(str(other), str(ck)) == (str(other), None)  # a typo: refused later as today
    assert resolve_load(str(ck), None) == (str(ck), None)
    assert resolve_load(None, str(ck)) == (None, None)
    make_checkpoint(ck)
    assert resolve_load(str(ck), str(ck)) == (str(ck), None)  # the requeued run resumes
    with pytest.raises(UserError, match=r"is a file, not a checkpoint folder"):
        resolve_load(str(ck / "latest"), str(ck))
    with pytest.raises(UserError, match=r"model_config.json is a file, not a folder"):
        load_model(ck / "model_config.json")


def test_other_model_names_the_flags_that_differ(tmp_path):
    from megatron_lite.checkpoint.load import check_same_model

    ck, _, _ = make_checkpoint(tmp_path / "ckpt")
    config = tiny_config()
    check_same_model(str(ck), config)
    with pytest.raises(UserError) as e:
        check_same_model(str(ck), config.replace(hidden_size=32, num_experts=4, dropout=0.1))
    msg = str(e.value)
    assert "\n" not in msg and "holds a different model" in msg and str(ck / "model_config.json") in msg
    for part in ("hidden_size 64 there, 32 from --hidden-size", "num_experts 0 there, 4 from --num-experts",
                 "dropout 0.0 there, 0.1 from --model"):
        assert part in msg, (part, msg)


def test_weights_folder_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a tmpfs")
    try:
        with pytest.raises(UserError) as e:
            make_checkpoint(disk / "ckpt")  # ~0.3 MB of weights
        msg = str(e.value)
        assert msg.startswith(f"no space left to save global_step7 in {disk / 'ckpt'}: ") and "\n" not in msg
        assert "needs about" in msg and "the partial tmp-global_step7 was removed" in msg
        assert not (disk / "ckpt" / "tmp-global_step7").exists() and not (disk / "ckpt" / "latest").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)
