"""Tensor parallelism through the real CLI: `deepspeed --num_gpus 2 launch/pretrain.py --tp 2` trains the same
model as one process at tp 1 (same seed, same global batch), and its checkpoint evaluates identically at tp 1.
Runs benchmarks/tp_equivalence.py's comparison, the script users can run themselves."""
import sys

import pytest

from launch_utils import REPO

sys.path.insert(0, str(REPO))
from benchmarks.tp_equivalence import build_small_corpus, compare  # noqa: E402

MODEL = ["--model", "tiny", "--num-layers", "2", "--hidden-size", "64", "--num-heads", "4", "--num-kv-heads", "2",
         "--ffn-hidden-size", "128"]


@pytest.mark.multirank
def test_tp2_training_matches_tp1_and_its_checkpoint_evaluates_at_tp1(tmp_path):
    import os

    tok, data = build_small_corpus(tmp_path, {**os.environ, "PYTHONPATH": str(REPO)})
    r = compare(tok, data, tmp_path, tp=2, iters=10, seq_length=32, micro_batch_size=4, model_flags=MODEL)
    assert sorted(r["losses_tp1"]) == list(range(1, 11)) and sorted(r["losses_tp2"]) == list(range(1, 11))
    assert r["losses_tp1"][10] < r["losses_tp1"][1] - 0.1  # it trains
    assert r["max_abs_loss_diff"] < 1e-5
    assert r["eval_loss_diff"] < 1e-5
    assert (tmp_path / "tp2/global_step10/mp_rank_01_model_states.pt").exists()  # really sharded
