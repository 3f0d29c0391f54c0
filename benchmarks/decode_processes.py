"""Decoding as users run it, for benchmarks/decode.py: a warm `tools/serve.py` (default flags) answering the
official `openai` client, and one-shot `tools/generate.py` processes, each against HF `generate` on the same
weights and prompt tokens.

Decode rate = (tokens of an N-token request - tokens of a 1-token request) / (time of one - time of the other),
so prefill, HTTP and process start-up cancel out. Per round both sides run both lengths (order alternating);
the ratio reported is the median over rounds of the paired ratio, with its range, by wall clock and by CPU
time (the server's and the generating processes' own, read from the kernel): on a machine shared with other
jobs a process waits for a core for seconds at a time, which lands in its wall time but not in its CPU time.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"

# One-shot HF side: load the HF folder, encode, generate N tokens greedily, print the completion. What a user
# of stock transformers runs, next to `tools/generate.py --greedy`.
HF_ONE_SHOT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()
ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
"""


def stdlib_tokenizer(vocab_size: int, out_dir: str):
    """A byte-level BPE of `vocab_size` trained on the standard library's sources: every id a random model
    emits then decodes to text, so the server's detokenisation does real work per token."""
    from megatron_lite.data.tokenizer import train_tokenizer

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return train_tokenizer((f.read_text(errors="ignore") for f in files), vocab_size, out_dir)


def make_folders(work: Path, config, state_dict) -> tuple[Path, Path]:
    """Our checkpoint folder and its HF export, both with the same tokenizer."""
    from megatron_lite.checkpoint.save import save_checkpoint_folder
    from megatron_lite.convert.hf import save_hf_folder

    tok = stdlib_tokenizer(config.vocab_size, str(work / "tokenizer"))
    ckpt = save_checkpoint_folder(work / "ckpt", config, state_dict, tok)
    hf = save_hf_folder(work / "hf", config, state_dict, tok)
    return Path(ckpt), Path(hf)


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def _rate(t1: float, tn: float, k1: int, kn: int) -> float:
    return (kn - k1) / (tn - t1)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _summary(ratios: list[float]) -> dict:
    return {"median": round(statistics.median(ratios), 2), "min": round(min(ratios), 2),
            "max": round(max(ratios), 2), "per_round": [round(r, 3) for r in ratios]}


def measure_server(ckpt: Path, hf_model, tokenizer, threads: int, n: int, rounds: int, log) -> dict:
    """tok/s of `tools/serve.py --load CKPT` (default flags) seen by the `openai` client vs HF generate in a
    loop in this process, at `threads` threads each; one warm-up request per length first."""
    import torch
    from openai import OpenAI

    from megatron_lite.parallel import free_port

    torch.set_num_threads(threads)
    port = free_port()
    server_log = open(ckpt.parent / "serve.log", "w")
    start = time.perf_counter()
    srv = subprocess.Popen([sys.executable, str(REPO / "tools/serve.py"), "--load", str(ckpt), "--port", str(port),
                            "--log-level", "warning"], cwd=REPO, env=_env(threads), stdout=server_log,
                           stderr=subprocess.STDOUT)
    try:
        while True:  # the port opens after the compile and warm-up
            if srv.poll() is not None:
                raise RuntimeError(f"tools/serve.py exited: {(ckpt.parent / 'serve.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        startup_s = time.perf_counter() - start
        log(f"server: up after {startup_s:.0f} s (compile and warm-up included)")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])

        def server(k):
            t, c = time.perf_counter(), _cpu_seconds(srv.pid)
            r = client.completions.create(model="m", prompt=PROMPT, max_tokens=k, temperature=0)
            return time.perf_counter() - t, r.usage.completion_tokens, r.choices[0].text, _cpu_seconds(srv.pid) - c

        @torch.inference_mode()
        def hf(k):
            t, c = time.perf_counter(), time.process_time()
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            return time.perf_counter() - t, k, text, time.process_time() - c

        for k in (1, n):  # warm-up
            server(k), hf(k)
        ratios, cpu_ratios, ours_rates, hf_rates, same = [], [], [], [], []
        for r in range(rounds):
            t = {}
            for side, fn in ((("server", server), ("hf", hf)) if r % 2 == 0 else (("hf", hf), ("server", server))):
                time.sleep(0.5)  # the other side's threads stop spinning
                t[side] = (fn(1), fn(n))
            (s1, sn), (h1, hn) = t["server"], t["hf"]
            ours, peer = _rate(s1[0], sn[0], s1[1], sn[1]), _rate(h1[0], hn[0], 1, n)
            ours_rates.append(ours), hf_rates.append(peer), ratios.append(ours / peer)
            cpu_ratios.append(_rate(s1[3], sn[3], s1[1], sn[1]) / _rate(h1[3], hn[3], 1, n))
            same.append(sn[2] == hn[2])
            log(f"server round {r}: {ours:.1f} tok/s vs HF {peer:.1f} ({ours / peer:.2f}x; CPU time "
                f"{cpu_ratios[-1]:.2f}x), same text {same[-1]}")
        return {"threads": threads, "new_tokens": n, "startup_s": round(startup_s, 1),
                "server_tok_s": round(statistics.median(ours_rates), 1), "hf_tok_s": round(statistics.median(hf_rates), 1),
                "speedup": _summary(ratios), "speedup_cpu_time": _summary(cpu_ratios), "same_text": all(same)}
    finally:
        srv.terminate()
        srv.wait(timeout=60)
        server_log.close()


def measure_one_shot(ckpt: Path, hf_dir: Path, threads: int, n: int, rounds: int, log, flags=()) -> dict:
    """Whole-process decode rate of `tools/generate.py --load CKPT --greedy` vs the HF script above."""
    def run(cmd):
        """(wall s, stdout, CPU s of the process and its threads)."""
        with tempfile.TemporaryFile("w+") as err:
            t = time.perf_counter()
            p = subprocess.Popen(cmd, cwd=REPO, env=_env(threads), stdout=subprocess.PIPE, stderr=err, text=True)
            out = p.stdout.read()
            _, status, usage = os.wait4(p.pid, 0)  # reaped here, with its resource usage
            wall = time.perf_counter() - t
            if os.waitstatus_to_exitcode(status):
                err.seek(0)
                raise RuntimeError(f"{cmd[1]} failed: {err.read()[-2000:]}")
        return wall, out, usage.ru_utime + usage.ru_stime

    ours = [sys.executable, str(REPO / "tools/generate.py"), "--load", str(ckpt), "--prompt", PROMPT, "--greedy",
            *flags, "--max-new-tokens"]
    hf = [sys.executable, "-c", HF_ONE_SHOT, str(hf_dir), PROMPT]
    ratios, cpu_ratios, ours_rates, hf_rates, same = [], [], [], [], []
    for r in range(rounds):
        t = {}
        for side, cmd in ((("ours", ours), ("hf", hf)) if r % 2 == 0 else (("hf", hf), ("ours", ours))):
            t[side] = (run(cmd + ["1"]), run(cmd + [str(n)]))
        o, h = (_rate(t[s][0][0], t[s][1][0], 1, n) for s in ("ours", "hf"))
        ours_rates.append(o), hf_rates.append(h), ratios.append(o / h)
        cpu_ratios.append(_rate(t["ours"][0][2], t["ours"][1][2], 1, n) / _rate(t["hf"][0][2], t["hf"][1][2], 1, n))
        same.append(t["ours"][1][1] == t["hf"][1][1])
        log(f"one-shot round {r}: generate.py {o:.1f} tok/s vs HF {h:.1f} ({o / h:.2f}x; CPU time "
            f"{cpu_ratios[-1]:.2f}x), same text {same[-1]}")
    return {"threads": threads, "new_tokens": n, "flags": list(flags), "ours_tok_s": round(statistics.median(ours_rates), 1),
            "hf_tok_s": round(statistics.median(hf_rates), 1), "speedup": _summary(ratios),
            "speedup_cpu_time": _summary(cpu_ratios), "same_text": all(same)}
