"""Optimizer, schedule and recipe: DeepSpeed's Muon under our engine, WSD/cosine values, the precedence of
flags over the ds_config over the preset's recipe."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_distributed  # noqa: E402
from launch_utils import SMALL, build_data, losses, run, zero2_with  # noqa: E402

from megatron_lite.errors import UserError  # noqa: E402
from megatron_lite.training.ds_config import load_ds_config, lr_settings, resolve_ds_config  # noqa: E402
from megatron_lite.training.recipe import RECIPES, Recipe, recipe_value  # noqa: E402
from megatron_lite.training.schedule import lr_at, wsd_lr_at  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ZERO2 = str(REPO / "ds_configs" / "zero2.json")
SMALL_MODEL = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=128, vocab_size=128)


# ------------------------------------------------------------------------------------------ schedules

def test_wsd_schedule_values():
    # warmup 2, stable, then the last 3 of 10 steps fall linearly to the floor, which stays
    assert [wsd_lr_at(s, 1.0, 0.0, 2, 10, 0.3) for s in range(12)] == pytest.approx(
        [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2 / 3, 1 / 3, 0.0, 0.0, 0.0])
    assert [wsd_lr_at(s, 2.0, 0.2, 0, 10, 0.2) for s in range(7, 11)] == pytest.approx([2.0, 1.1, 0.2, 0.2])
    assert wsd_lr_at(9, 1.0, 0.1, 0, 10, 0.0) == 1.0  # no decay part: constant to the end
    # the decay never reaches back into the warmup
    assert [wsd_lr_at(s, 1.0, 0.0, 4, 5, 1.0) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.0])
    assert lr_at(12, 1.0, 0.1, 4, 20) == pytest.approx(0.55)  # cosine unchanged


def test_scheduler_follows_wsd_per_group_and_resumes_from_the_step():
    from megatron_lite.training.schedule import build_scheduler

    def sched():
        p = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
        opt = torch.optim.SGD([{"params": [p[0]], "lr": 1.0}, {"params": [p[1]], "lr": 0.1}])
        return opt, build_scheduler(opt, 1.0, 0.0, 0, 10, style="wsd", wsd_decay_frac=0.5)

    opt, s = sched()
    seen, saved = [], None
    for i in range(10):
        if i == 5:  # a checkpoint: DeepSpeed saves both (the optimizer's groups hold the current lr)
            saved = opt.state_dict(), s.state_dict()
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        s.step()
    assert [a for a, _ in seen] == pytest.approx([1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0.0])
    assert [b for _, b in seen] == pytest.approx([0.1 * a for a, _ in seen])  # Muon's group: same shape
    opt2, s2 = sched()
    opt2.load_state_dict(saved[0])
    s2.load_state_dict(saved[1])
    again = []
    for _ in range(5):
        again.append([g["lr"] for g in opt2.param_groups])
        opt2.step()
        s2.step()
    assert again == seen[5:]


# ------------------------------------------------------------------------------------------ ds_config

def test_flags_beat_json_beat_recipe():
    base = load_ds_config(ZERO2)
    tiny = RECIPES["tiny"]
    cfg = resolve_ds_config(base, dp=2, micro_batch_size=2, train_iters=200, recipe=tiny)
    assert cfg["optimizer"]["type"] == {"adamw": "AdamW", "muon": "Muon"}[tiny.optimizer]
    assert lr_settings(cfg)["max_lr"] == tiny.lr and lr_settings(cfg)["warmup_iters"] == tiny.warmup_iters(200)
    assert lr_settings(cfg)["style"] == tiny.decay_style
    assert cfg["optimizer"]["params"]["betas"] == [tiny.adam_beta1, tiny.adam_beta2] == [0.9, 0.99]
    assert tiny.optimizer == "muon" and cfg["gradient_clipping"] == 0.0  # Muon's default: see below
    small = resolve_ds_config(base, dp=2, micro_batch_size=2, train_iters=200, recipe=RECIPES["small"])
    assert small["optimizer"]["type"] == "AdamW" and small["gradient_clipping"] == RECIPES["small"].grad_clip == 1.0
    mine = Recipe(optimizer="muon", lr=3e-3, muon_lr=0.05, min_lr_ratio=0.0, warmup_frac=0.1, decay_style="wsd",
                  wsd_decay_frac=0.25, weight_decay=0.0)
    cfg = resolve_ds_config(base, dp=2, micro_batch_size=2, train_iters=100, recipe=mine)
    assert cfg["optimizer"] == {"type": "Muon", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                           "weight_decay": 0.0, "muon_lr": 0.05,
                                                           "ns_method": "standard"}}  # "auto" on a CPU
    assert cfg["gradient_clipping"] == 0.0  # Muon's default: ZeRO would clip its orthogonalised updates
    assert lr_settings(cfg) == dict(max_lr=3e-3, min_lr=0.0, warmup_iters=10, decay_iters=100, style="wsd",
                                    wsd_decay_frac=0.25)
    # an explicit JSON value beats the recipe, a flag beats both
    explicit = {**base, "optimizer": {"type": "AdamW", "params": {"lr": 5e-4, "muon_lr": 0.1, "betas": [0.8, 0.9],
                                                                  "ns_method": "gram"}},
                "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 3}}, "gradient_clipping": 0.5}
    cfg = resolve_ds_config(explicit, dp=2, micro_batch_size=2, train_iters=100, recipe=mine)
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 5e-4, "betas": [0.8, 0.9],
                                                            "weight_decay": 0.0}}  # no Muon keys
    assert lr_settings(cfg) == dict(max_lr=5e-4, min_lr=0.0, warmup_iters=3, decay_iters=100, style="cosine",
                                    wsd_decay_frac=0.0)
    cfg = resolve_ds_config(explicit, dp=2, micro_batch_size=2, train_iters=100, recipe=mine, optimizer="muon",
                            lr=1e-3, muon_lr=0.01, warmup_iters=0, lr_decay_style="wsd", wsd_decay_frac=0.5,
                            min_lr=1e-4, adam_beta2=0.98, grad_clip=2.0)
    assert cfg["optimizer"]["params"] == {"lr": 1e-3, "muon_lr": 0.01, "betas": [0.8, 0.98], "weight_decay": 0.0,
                                          "ns_method": "gram"}
    assert cfg["gradient_clipping"] == 2.0
    assert lr_settings(cfg) == dict(max_lr=1e-3, min_lr=pytest.approx(1e-4), warmup_iters=0, decay_iters=100,
                                    style="wsd", wsd_decay_frac=0.5)


def test_embedding_lr_flag_beats_json_beats_recipe_and_reaches_its_group_only():
    from megatron_lite.config import get_preset
    from megatron_lite.model.gpt import GPT
    from megatron_lite.training.engine import param_groups

    base = load_ds_config(ZERO2)
    tiny = RECIPES["tiny"]
    assert tiny.embedding_lr is not None and tiny.embedding_lr > tiny.lr
    params = lambda cfg, **kw: resolve_ds_config(cfg, dp=1, micro_batch_size=2, **kw)["optimizer"]["params"]
    assert params(base, recipe=tiny)["embedding_lr"] == tiny.embedding_lr
    assert "embedding_lr" not in params(base, recipe=RECIPES["small"])  # no entry: the embedding runs at --lr
    given = {**base, "optimizer": {"type": "auto", "params": {"lr": "auto", "embedding_lr": 0.5}}}
    assert params(given, recipe=tiny)["embedding_lr"] == 0.5
    assert params(given, recipe=tiny, embedding_lr=0.25)["embedding_lr"] == 0.25

    model = GPT(get_preset("tiny", **SMALL_MODEL, tie_embeddings=False))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: g for g in param_groups(model, 0.1, embedding_lr=0.03)}
    assert [names[id(p)] for p in groups["embedding"]["params"]] == ["embed_tokens.weight"]
    assert groups["embedding"]["lr"] == 0.03 and groups["embedding"]["weight_decay"] == 0.0
    assert "lm_head.weight" in {names[id(p)] for p in groups["decay"]["params"]}  # the untied head: --lr
    assert not any("lr" in g for n, g in groups.items() if n != "embedding")
    assert "lr" not in {g["name"]: g for g in param_groups(model, 0.1)}["embedding"]


def test_muon_newton_schulz_method_is_picked_by_device(monkeypatch):
    base = {**load_ds_config(ZERO2), "bf16": {"enabled": False}}  # "auto" would query the (absent) GPU
    method = lambda cfg=base: resolve_ds_config(cfg, dp=1, micro_batch_size=2, optimizer="muon")[
        "optimizer"]["params"]["ns_method"]
    assert method() == "standard"  # CPU: bf16 quintic iterations, faster than gram's fp32 fallback
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert method() == "gram"  # DeepSpeed's default, fp16 on GPUs
    assert method({**base, "optimizer": {"type": "Muon", "params": {"ns_method": "standard"}}}) == "standard"


def test_muon_keeps_zero_and_bad_combinations_are_one_line_errors():
    base = load_ds_config(ZERO2)
    adamw = resolve_ds_config(base, dp=1, micro_batch_size=2, optimizer="adamw")
    assert adamw["zero_optimization"] == {"stage": 0}  # AdamW at dp=1: same math without ZeRO's copies
    muon = resolve_ds_config(base, dp=1, micro_batch_size=2, optimizer="muon")
    assert muon["zero_optimization"]["stage"] == 2  # Muon runs Newton-Schulz inside DeepSpeed's ZeRO optimizer
    zero0 = resolve_ds_config(load_ds_config(str(REPO / "ds_configs" / "zero0.json")), dp=2, micro_batch_size=2,
                              optimizer="muon")
    assert zero0["zero_optimization"]["stage"] == 1 and "zero_note" in zero0
    offload = load_ds_config(str(REPO / "ds_configs" / "zero2_offload.json"))
    for kwargs, message in ((dict(optimizer="adamw", muon_lr=0.02), "--muon-lr needs --optimizer muon"),
                            (dict(optimizer="muon", cfg=offload), "Muon with ZeRO optimizer offload"),
                            (dict(lr_decay_style="cosine", wsd_decay_frac=0.2), "needs --lr-decay-style wsd"),
                            (dict(lr_decay_style="wsd", wsd_decay_frac=1.5), "must be in \\[0, 1\\]"),
                            (dict(cfg={**base, "optimizer": {"type": "SGD"}}), "optimizer type 'SGD'"),
                            (dict(adam_beta2=1.0), "Adam beta2 1.0 .* must be in \\[0, 1\\)"),
                            (dict(grad_clip=-1.0), "gradient clipping -1.0 .* must be >= 0"),
                            (dict(cfg={**base, "optimizer": {"params": {"betas": [0.9]}}}), "betas \\[0.9\\] must be"),
                            (dict(cfg={**base, "scheduler": {"type": "OneCycle"}}), "scheduler type 'OneCycle'")):
        with pytest.raises(UserError, match=message):
            resolve_ds_config(kwargs.pop("cfg", base), dp=2, micro_batch_size=2, **kwargs)


def test_every_preset_has_a_recipe_with_warmup():
    from megatron_lite.config import PRESETS

    assert set(RECIPES) == set(PRESETS)
    assert all(r.warmup_iters(100) >= 1 and r.lr <= 2e-3 for r in RECIPES.values())
    assert RECIPES["mini-llm"].lr < RECIPES["small"].lr < RECIPES["tiny"].lr


def test_sft_runs_on_its_own_recipe_and_the_main_job_on_the_recipes():
    """With no lr/warmup flags (as the main job runs them) the CLI resolves pretraining to the preset's recipe and
    SFT to the SFT recipe, whatever the preset: the schedule the main job used to spell out as flags."""
    from megatron_lite.config import get_preset
    from megatron_lite.training.cli import build_parser, plan_parallel

    for kind, model, iters, lr, warmup in (("pretrain", "tiny", 520, 2e-3, 26), ("pretrain", "tiny-moe", 260, 2e-3, 13),
                                           ("pretrain", "small", 100, 1e-3, 5), ("sft", "small", 250, 1e-3, 12)):
        args = ["--train-iters", str(iters), "--data-path", "x", "--micro-batch-size", "2"]
        args += ["--model", model] if kind == "pretrain" else ["--pretrained", "p"]
        a = build_parser(kind).parse_args(args)
        _, cfg, _ = plan_parallel(a, get_preset(model), load_ds_config(ZERO2))
        assert cfg["optimizer"]["params"]["lr"] == lr, (kind, model)
        assert cfg["scheduler"]["params"]["warmup_num_steps"] == warmup, (kind, model)
        assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.99 if model.startswith("tiny") and kind == "pretrain"
                                                       else 0.95], (kind, model)
        if kind == "pretrain":  # the tiny recipes start every output projection at 0; a flag turns it off
            assert recipe_value(a.zero_init_output, a.model, "zero_init_output") == model.startswith("tiny")
            off = build_parser(kind).parse_args(args + ["--no-zero-init-output"])
            assert recipe_value(off.zero_init_output, off.model, "zero_init_output") is False


def test_use_muon_on_hidden_matrices_only():
    from megatron_lite.config import get_preset
    from megatron_lite.model.gpt import GPT
    from megatron_lite.training.engine import tag_muon_params

    model = GPT(get_preset("tiny-moe", **SMALL_MODEL, num_experts=2, topk=1, tie_embeddings=False))
    tag_muon_params(model)
    on = {n for n, p in model.named_parameters() if p.use_muon}
    assert all(p.dim() == 2 for n, p in model.named_parameters() if n in on)
    assert not any(k in n for n in on for k in ("embed", "lm_head", "norm", ".gate."))
    assert {n.split(".")[-2] for n in on} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}, on
    assert sum("deepspeed_experts" in n for n in on) == 2 * 2 * 3  # layers x experts x (gate, up, down)
    assert sum(p.numel() for p in model.parameters() if p.use_muon) == model.config.muon_params()
    dense = GPT(get_preset("tiny", **SMALL_MODEL, ffn_type="mlp", attention_bias=True))
    tag_muon_params(dense)
    assert sum(p.numel() for p in dense.parameters() if p.use_muon) == dense.config.muon_params()


# ------------------------------------------------------------------------------------------ Muon in the engine

def _muon_step_worker(rank: int, world: int, moe: bool) -> dict:
    """One Muon step through build_engine on the same batch on every rank: Newton-Schulz calls counted, and
    each matrix's weight change against DeepSpeed's own muon_update of the plain model's gradient."""
    import deepspeed.runtime.zero.muon.original_muon as om

    from megatron_lite.config import get_preset
    from megatron_lite.parallel import ParallelDims, init_distributed
    from megatron_lite.training.engine import build_engine, build_model

    init_distributed()  # DeepSpeed's comm backend over the harness's gloo group (MoE all-to-all)
    extra = dict(num_experts=4, topk=2) if moe else {}
    config = get_preset("tiny-moe" if moe else "tiny", **SMALL_MODEL, **extra)
    dims = ParallelDims.from_world(world, ep=2 if moe else 1, num_experts=4 if moe else None).build()
    model = build_model(config, dims, seed=0)
    batch = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    x, y = batch[:, :-1], batch[:, 1:]

    def loss_of(m):
        torch.manual_seed(2)  # router noise: the same draw in both forwards
        out = m(x, y)
        return out.loss if out.aux_loss is None else out.loss + out.aux_loss

    loss_of(model).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    muon_lr = 0.02  # the shipped config's clip ("auto"), which must leave Muon's step whole
    # fp32 Newton-Schulz ("gram" on a CPU), so the comparison can be exact: bf16 iterations ("standard", the CPU
    # default) amplify the last-bit differences of ZeRO's reduced gradients in poorly conditioned expert matrices
    cfg = resolve_ds_config(zero2_with(ns_method="gram"), dims.dp, micro_batch_size=2, optimizer="muon", lr=1e-3,
                            muon_lr=muon_lr, weight_decay=0.0, warmup_iters=0, train_iters=10)
    engine = build_engine(model, cfg, dims)
    calls = []
    real = om.muon_update

    def counting(grad, *args, **kwargs):
        calls.append(tuple(grad.shape))
        return real(grad, *args, **kwargs)

    om.muon_update = counting
    try:
        engine.backward(loss_of(engine))
        engine.step()
    finally:
        om.muon_update = real
    muon = {n for n, p in engine.module.named_parameters() if p.use_muon}
    rel_err, spectrum = {}, {}
    for n, p in engine.module.named_parameters():
        if n not in muon:
            continue
        update = (w0[n] - p.detach()) / muon_lr
        ref = real(grads[n].clone(), torch.zeros_like(grads[n]), beta=0.95, ns_method="gram")
        rel_err[n] = float((update - ref).norm() / ref.norm())
        if n.endswith("layers.0.self_attn.q_proj.weight"):
            # A batch of few tokens gives a low-rank gradient: compare the spectra on its rank only.
            rank = int(torch.linalg.matrix_rank(grads[n]))
            s_update, s_grad = torch.linalg.svdvals(update)[:rank], torch.linalg.svdvals(grads[n])[:rank]
            spectrum = dict(update=float(s_update.max() / s_update.min()), grad=float(s_grad.max() / s_grad.min()),
                            rank=rank)
    adam_moved = all(not torch.equal(w0[n], p.detach()) for n, p in engine.module.named_parameters()
                     if n not in muon)
    return dict(calls=calls, n_muon=len(muon), stage=engine.zero_optimization_stage(), rel_err=rel_err,
                spectrum=spectrum, adam_moved=adam_moved,
                opt=[c.__name__ for c in type(engine.basic_optimizer).__mro__])


def _check_muon_step(r: dict, where: str):
    assert "MuonWithAuxAdam" in r["opt"], r["opt"]
    assert r["stage"] == 2
    assert r["n_muon"] > 0 and len(r["rel_err"]) == r["n_muon"]
    # every matrix moved by exactly DeepSpeed's orthogonalised update of its gradient (not by SGD)
    assert max(r["rel_err"].values()) < 2e-3, (where, r["rel_err"])
    assert r["adam_moved"]


@pytest.mark.multirank
def test_muon_orthogonalises_one_rank_and_two_ranks_zero2():
    one = run_distributed(_muon_step_worker, world_size=1, args=(False,), timeout=300)[0]
    _check_muon_step(one, "1 rank")
    assert len(one["calls"]) == one["n_muon"]  # one Newton-Schulz per matrix per step
    assert one["spectrum"]["update"] < 3 < one["spectrum"]["grad"], one["spectrum"]  # near-orthogonal: flat
    two = run_distributed(_muon_step_worker, world_size=2, args=(False,), timeout=300)
    for rank, r in enumerate(two):
        _check_muon_step(r, f"rank {rank} of 2")
    # ZeRO-2 shards the matrices: each is orthogonalised by the rank(s) owning it, all of them by someone
    assert sum(len(r["calls"]) for r in two) >= two[0]["n_muon"] >= max(len(r["calls"]) for r in two) > 0


@pytest.mark.multirank
def test_muon_moe_ep2_expert_matrices_orthogonalised():
    per_rank = run_distributed(_muon_step_worker, world_size=2, args=(True,), timeout=300)
    for rank, r in enumerate(per_rank):
        _check_muon_step(r, f"MoE rank {rank}")
        assert any("deepspeed_experts" in n for n in r["rel_err"])


@pytest.mark.multirank
def test_muon_resume_two_ranks_is_exact(tmp_path):
    data = build_data(tmp_path / "data")
    args = ["--model", "tiny", *SMALL, "--tokenizer", data["tok"], "--data-path", data["pt"], "--optimizer", "muon",
            "--micro-batch-size", 2, "--save-interval", 10]
    straight = tmp_path / "straight"
    run("launch/pretrain.py", [*args, "--train-iters", 20, "--save", straight], ranks=2)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("model_config.json", "tokenizer", "global_step10"):
        (shutil.copytree if (straight / name).is_dir() else shutil.copy)(straight / name, resumed / name)
    (resumed / "latest").write_text("global_step10")
    run("launch/pretrain.py", [*args, "--train-iters", 20, "--save", resumed, "--load", resumed], ranks=2)
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(11, 21))
    assert all(a[s] == b[s] for s in b), [(s, a[s], b[s]) for s in b]
    assert a[20] < a[1]
