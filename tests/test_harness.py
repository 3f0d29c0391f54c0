"""lm-evaluation-harness on our HF export: the real `lm_eval` runs the three local tasks (no download), its bits
per byte on the held-out stdlib files equals ours on the same documents, its multiple-choice accuracy equals
our model's own choice, the task data is the corpus' held-out split, and bad input fails in one line."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from inference_utils import tiny_config, tiny_model
from megatron_lite.data import corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 4  # documents per task: lm_eval takes the first LIMIT, in the task's order
WINDOW = 64  # the model's context: documents span several rolling windows


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(HF folder, our GPT, tokenizer): a random tiny model exported as stock Llama, our real tokenizer."""
    from megatron_lite.convert.hf import save_hf_folder
    from megatron_lite.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("harness")
    texts = [t for _, t in corpus.stdlib_documents(60_000)]
    tok = train_tokenizer(texts, 512, str(d / "tok"))
    config = tiny_config(vocab_size=len(tok), max_seq_len=WINDOW)
    model = tiny_model(config, seed=0, scale=2.0)
    hf = save_hf_folder(d / "hf", config, model.state_dict(), tok)
    return hf, model, tok


def _mc_choice(model, tok, item) -> tuple[int, int]:
    """(argmax, length-normalised argmax) of our model's log-likelihood of each choice after the chat prompt,
    with lm_eval's encoding: trailing whitespace of the context moves to the continuation, and the
    continuation's tokens are those of context + continuation beyond the context's."""
    context = tok.apply_chat_template([{"role": "user", "content": item["question"]}], tokenize=False,
                                      add_generation_prompt=True)
    stripped = context.rstrip()
    lls = []
    for choice in item["choices"]:
        whole = tok(context + choice, add_special_tokens=False)["input_ids"]
        n_ctx = len(tok(stripped, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = model(torch.tensor([whole[:-1]])).logits.float().log_softmax(-1)[0]
        lls.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
    norm = [ll / len(c) for ll, c in zip(lls, item["choices"])]
    return max(range(len(lls)), key=lls.__getitem__), max(range(len(norm)), key=norm.__getitem__)


@pytest.fixture(scope="module")
def harness_json(export):
    """launch/eval.py --harness on the export, all three local tasks, LIMIT documents each."""
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import eval as launch_eval

    out = export[0].parent / "results.json"
    launch_eval.main(["--harness", "--hf", str(export[0]), "--output", str(out), "--limit", str(LIMIT),
                      "--batch-size", "16"])
    return out


def test_lm_eval_runs_local_tasks_and_matches_our_bits_per_byte(export, harness_json):
    from megatron_lite.eval.bits_per_byte import document_bits_per_byte

    hf, model, tok = export
    res = json.loads(harness_json.read_text())["results"]
    assert set(res) == {"ml_arithmetic", "ml_docstring_mc", "ml_heldout_bpb"}
    assert all(r["sample_len"] == LIMIT for r in res.values())

    # Bits per byte: lm_eval's rolling windows over [prefix] + document tokens (prefix = EOS, our tokenizer
    # has no BOS; windows of max_position_embeddings = our max_seq_len) are exactly ours.
    docs = corpus.heldout_documents()[:LIMIT]
    ours = document_bits_per_byte(model, tok, docs)
    assert ours["tokens"] > 3 * WINDOW * LIMIT  # several windows per document: the rolling path is exercised
    theirs = res["ml_heldout_bpb"]["bits_per_byte,none"]
    assert abs(theirs - ours["bits_per_byte"]) / ours["bits_per_byte"] < 1e-3, (theirs, ours)
    assert math.isclose(res["ml_heldout_bpb"]["byte_perplexity,none"], 2 ** theirs, rel_tol=1e-9)

    # Multiple choice: lm_eval's acc / acc_norm are our model's own picks over the same chat-formatted prompts.
    items = corpus.heldout_docstring_choices()[:LIMIT]
    picks = [_mc_choice(model, tok, it) for it in items]
    assert res["ml_docstring_mc"]["acc,none"] == pytest.approx(sum(p == it["gold"] for (p, _), it in zip(picks, items)) / LIMIT)
    assert res["ml_docstring_mc"]["acc_norm,none"] == pytest.approx(
        sum(p == it["gold"] for (_, p), it in zip(picks, items)) / LIMIT)
    # A random model answers no arithmetic question (the scoring itself: test_arithmetic_task_scores...).
    assert res["ml_arithmetic"]["exact_match,strip"] == 0.0


def test_arithmetic_task_scores_exact_match():
    """The YAML's prompt, target and metric through lm_eval's own Task object."""
    from lm_eval.tasks import TaskManager

    from megatron_lite.eval.harness import TASK_DIR

    task = TaskManager(include_path=str(TASK_DIR), include_defaults=False).load(["ml_arithmetic"])["tasks"]
    task = next(iter(task.values()))
    docs = list(task.test_docs())
    assert [(d["question"], d["answer"]) for d in docs] == corpus.heldout_arithmetic()
    doc = docs[0]
    assert task.doc_to_text(doc) == doc["question"] and task.doc_to_target(doc) == doc["answer"]
    assert task.process_results(doc, [doc["answer"]])["exact_match"] == 1.0
    assert task.process_results(doc, [doc["answer"] + "0"])["exact_match"] == 0.0


def test_task_data_is_the_corpus_held_out_split(tmp_path):
    corpus.write_corpus(str(tmp_path), pretrain_mb=0.3, sft_arith=300, seed=0)
    rows = {k: [json.loads(line) for line in open(tmp_path / f"{k}.jsonl")] for k in ("pretrain_valid", "sft_valid")}
    assert corpus.heldout_documents(0.3) == [r["text"] for r in rows["pretrain_valid"]]
    valid = [r["conversations"] for r in rows["sft_valid"]]
    first_turn = {next(m["content"] for m in c if m["role"] == "user"): next(m["content"] for m in c if m["role"] == "assistant")
                  for c in valid}
    arith = corpus.heldout_arithmetic(300)
    assert arith and all(first_turn[q] == a for q, a in arith)
    items = corpus.heldout_docstring_choices()
    assert len(items) > 20
    for it in items:  # the right choice is the held-out answer; the distractors are other, distinct summaries
        assert first_turn[it["question"]] == it["choices"][it["gold"]]
        assert len(set(it["choices"])) == 4
    assert {it["gold"] for it in items} == {0, 1, 2, 3}


@pytest.mark.parametrize("args,message", [
    (["--hf", "{tmp}/nowhere"], "no HF model folder there"),
    (["--hf", "{hf}", "--tasks", "ml_heldout_bpb", "no_such_task"], "unknown task 'no_such_task'"),
], ids=["missing-hf-folder", "unknown-task"])
def test_bad_input_is_one_line(export, tmp_path, args, message):
    hf = export[0]
    out = tmp_path / "r.json"
    cmd = [sys.executable, "launch/eval.py", "--harness", "--output", str(out),
           *[a.format(tmp=tmp_path, hf=hf) for a in args]]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in p.stderr.splitlines() if "real_accelerator" not in ln]
    assert p.returncode != 0 and lines[-1].startswith("launch/eval.py: error: ") and message in lines[-1], p.stderr
    assert "Traceback" not in p.stderr and not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_report_card_reads_the_run_files(export, harness_json, tmp_path):
    from megatron_lite.eval.report import write_report

    hf, model, _ = export
    work = tmp_path / "run"
    (work / "ckpt").mkdir(parents=True)
    model.config.save(work / "ckpt/model_config.json")
    rows = [{"step": 5, "loss": 8.0, "tokens_per_s": 900.0}, {"step": 10, "loss": 5.5, "tokens_per_s": 1234.4},
            {"step": 10, "eval_loss": 5.7}]
    (work / "ckpt/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"rows": {"held-out bits per byte": "2.345", "model": "x"}, "timings_s": {"pretrain": 3.0, "SFT": 1.5},
               "samples": [["What is 1 + 1?", "2"]]}
    (work / "summary.json").write_text(json.dumps(summary))
    (work / "loss_curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (work / "c.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    out = write_report(work, title="run", command=["python", "launch/main_job.py"], stages={"pretrain": work / "ckpt"},
                       model_ckpt=work / "ckpt", hf_dir=hf, data={"corpus": work / "c.jsonl"},
                       harness=json.loads(harness_json.read_text()), png=work / "loss_curves.png")
    text = out.read_text()
    bpb = json.loads(harness_json.read_text())["results"]["ml_heldout_bpb"]["bits_per_byte,none"]
    assert f"| ml_heldout_bpb | bits_per_byte | {bpb:.4f} | - |" in text
    assert "| pretrain | 10 | 8.000 -> 5.500 | 5.700 | 1,234 |" in text
    assert "| total | 4.5 |" in text and "| held-out bits per byte | 2.345 |" in text and "| corpus | 2 |" in text
    n = sum(p.numel() for p in model.parameters())
    assert f"| parameters | {n / 1e6:.2f} M |" in text
    assert "**assistant:** 2" in text and "![loss curves](loss_curves.png)" in text
    assert not list(work.glob("*.tmp"))
