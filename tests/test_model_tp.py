"""The tensor-parallel GPT (tp=2 on 2 gloo processes) is the tp=1 GPT: same seed -> same full weights, same
logits and loss, same (gathered) gradients, same trajectory over a few optimizer steps, same KV-cache decode;
and its checkpoint reshards to tp=1 and back. Each rank builds both models; tolerance 1e-5 (fp32).
"""
import pytest
import torch
import torch.distributed as dist

from dist_utils import assert_check_passed, run_checks, run_distributed
from megatron_lite.config import ModelConfig
from megatron_lite.errors import UserError
from megatron_lite.model.gpt import GPT
from megatron_lite.parallel import ParallelDims
from megatron_lite.tensor_parallel import gather_state_dict, shard_state_dict, tp_shard_specs

TP = 2
ATOL = 1e-5
SMALL = dict(vocab_size=256, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
             max_seq_len=64)
CONFIGS = {
    "tied_swiglu": ModelConfig(**SMALL, name="tied_swiglu"),
    "untied_mlp_bias": ModelConfig(**SMALL, tie_embeddings=False, ffn_type="mlp", attention_bias=True,
                                   name="untied_mlp_bias"),
}


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def pair(cfg, group, seed=1234):
    torch.manual_seed(seed)
    par = GPT(cfg, tp_group=group)
    torch.manual_seed(seed)
    ref = GPT(cfg)
    return par, ref


def batch(cfg, seed=0, B=2, T=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    labels[0, :3] = -100  # prompt tokens without loss, as in SFT
    return ids, labels


CHECKS = {}


def per_config(fn):
    for name, cfg in CONFIGS.items():
        CHECKS[f"{fn.__name__}[{name}]"] = (lambda cfg: lambda dims: fn(dims, cfg))(cfg)
    return fn


@per_config
def same_init(dims, cfg):
    g = dims.tp_group
    par, ref = pair(cfg, g)
    specs = tp_shard_specs(par)
    full = gather_state_dict(par.state_dict(), specs, g)
    ref_sd = ref.state_dict()
    assert tp_shard_specs(ref) == specs, "tp=1 and tp=2 models describe their shards differently"
    assert par.state_dict().keys() == ref_sd.keys()
    for k in ref_sd:
        assert torch.equal(full[k], ref_sd[k]), f"{k}: gathered tp=2 init != tp=1 init"
    # tp=2 really is split: q/k/v/o, FFN and embedding each hold half
    assert par.embed_tokens.weight.shape == (cfg.vocab_size // 2, cfg.hidden_size)
    assert par.layers[0].self_attn.k_proj.weight.shape == (cfg.num_kv_heads * cfg.head_dim // 2, cfg.hidden_size)


@per_config
def same_forward_backward(dims, cfg):
    g = dims.tp_group
    par, ref = pair(cfg, g)
    ids, labels = batch(cfg)
    out, out_ref = par(ids, labels), ref(ids, labels)
    out.loss.backward()
    out_ref.loss.backward()
    specs = tp_shard_specs(par)
    grads = gather_state_dict({n: p.grad for n, p in par.named_parameters()}, specs, g)
    local = par(ids, labels, gather_logits=False)
    close(out.logits, out_ref.logits, "logits")
    close(out.loss, out_ref.loss, "loss")
    close(local.loss, out_ref.loss, "loss without gathered logits")
    close(local.logits, out_ref.logits.chunk(TP, -1)[dims.tp_rank], "vocab-parallel logits")
    for n, p in ref.named_parameters():
        close(grads[n], p.grad, f"grad {n}")


@per_config
def same_packed_forward_backward(dims, cfg):
    """Packed rows (SFT packing): position ids restart and attention stays within each document under tp too."""
    par, ref = pair(cfg, dims.tp_group)
    ids, labels = batch(cfg)
    doc = torch.tensor([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])
    pos = torch.tensor([list(range(5)) + list(range(4)) + list(range(3)), list(range(12))])
    out, out_ref = (m(ids, labels, position_ids=pos, document_ids=doc) for m in (par, ref))
    out.loss.backward()
    out_ref.loss.backward()
    grads = gather_state_dict({n: p.grad for n, p in par.named_parameters()}, tp_shard_specs(par), dims.tp_group)
    close(out.logits, out_ref.logits, "packed logits")
    close(out.loss, out_ref.loss, "packed loss")
    for n, p in ref.named_parameters():
        close(grads[n], p.grad, f"packed grad {n}")


@per_config
def same_training_steps(dims, cfg):
    # the trainer's own AdamW param groups: the sharded embedding must skip weight decay like nn.Embedding
    from megatron_lite.training.engine import param_groups

    par, ref = pair(cfg, dims.tp_group)
    groups = [param_groups(m, weight_decay=0.1) for m in (par, ref)]
    names = [{g["name"]: sorted(n for n, p in m.named_parameters() if any(p is q for q in g["params"]))
              for g in gs} for m, gs in zip((par, ref), groups)]
    assert names[0] == names[1], f"tp=2 param groups differ from tp=1: {names}"
    opts = [torch.optim.AdamW(gs, lr=3e-3) for gs in groups]
    losses = []
    for step in range(3):
        ids, labels = batch(cfg, seed=step)
        pair_losses = []
        for m, opt in zip((par, ref), opts):
            loss = m(ids, labels, gather_logits=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            pair_losses.append(loss.detach())
        losses.append(pair_losses)
    for step, (l_par, l_ref) in enumerate(losses):
        close(l_par, l_ref, f"loss at step {step}")


@per_config
def same_kv_cache_decode(dims, cfg):
    par, ref = pair(cfg, dims.tp_group)
    par.eval(), ref.eval()
    ids, _ = batch(cfg, B=2, T=6)
    outs = []
    for m in (par, ref):
        cache = m.new_kv_cache(2, max_len=10)
        with torch.no_grad():
            step_logits = [m(ids, kv_cache=cache).logits[:, -1]]
            for t in range(3):  # feed back fixed tokens so both models see the same inputs
                step_logits.append(m(ids[:, t:t + 1], kv_cache=cache).logits[:, -1])
        outs.append(torch.stack(step_logits))
    close(outs[0], outs[1], "incremental decode logits")


@per_config
def checkpoint_reshards(dims, cfg):
    g, r = dims.tp_group, dims.tp_rank
    par, ref = pair(cfg, g, seed=7)
    other_par, _ = pair(cfg, g, seed=8)
    specs = tp_shard_specs(par)
    full = gather_state_dict(par.state_dict(), specs, g)     # tp=2 -> full: loads into a tp=1 model
    _, fresh_ref = pair(cfg, None, seed=8)
    fresh_ref.load_state_dict(full)
    other_par.load_state_dict(shard_state_dict(ref.state_dict(), specs, r, TP))  # full -> tp=2 shard
    ids, labels = batch(cfg)
    loss_tp1_from_tp2 = fresh_ref(ids, labels).loss
    loss_tp2_from_tp1 = other_par(ids, labels).loss
    loss_ref = ref(ids, labels).loss
    close(loss_tp1_from_tp2, loss_ref, "tp=2 checkpoint evaluated at tp=1")
    close(loss_tp2_from_tp1, loss_ref, "tp=1 checkpoint evaluated at tp=2")


def moe_with_tp_is_a_user_error(dims):
    with pytest.raises(UserError, match="dense models only"):
        GPT(ModelConfig(**SMALL, num_experts=4, topk=2), tp_group=dims.tp_group)


CHECKS["moe_with_tp_is_a_user_error"] = moe_with_tp_is_a_user_error


def _worker(rank, world_size):
    dims = ParallelDims.from_world(world_size, tp=TP).build()
    assert dist.get_world_size(dims.tp_group) == TP
    return run_checks(CHECKS, dims)


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, world_size=TP, timeout=180)


@pytest.mark.multirank
@pytest.mark.parametrize("name", list(CHECKS))
def test_tp2_model_equals_tp1(results, name):
    assert_check_passed(results, name)


def test_tp1_model_tags_its_shardable_params():
    # a tp=1 model (plain nn.Linear / nn.Embedding) can describe how its checkpoint splits for any tp
    specs = tp_shard_specs(GPT(CONFIGS["untied_mlp_bias"]))
    assert specs["embed_tokens.weight"].dim == 0 and specs["lm_head.weight"].dim == 0
    assert specs["layers.0.self_attn.q_proj.bias"].dim == 0
    assert specs["layers.1.self_attn.o_proj.weight"].dim == 1 and specs["layers.1.mlp.fc2.weight"].dim == 1
    assert "layers.1.mlp.fc2.bias" not in specs and "norm.weight" not in specs  # replicated
    moe = tp_shard_specs(GPT(ModelConfig(**SMALL, num_experts=2, topk=1)))
    assert not [k for k in moe if "expert" in k], "expert weights are split by ep, not tp"
