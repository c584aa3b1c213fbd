#!/usr/bin/env python3
"""Perplexity of a GGUF file as llama.cpp itself computes it (PyPI llama-cpp-python), scored the
way mcompress's eval scores it: the first MAX_TOKENS tokens of TEXT (no BOS), non-overlapping
windows of WINDOW tokens, each window evaluated from an empty context, every next token of a
window scored, log-softmax in float64.

    llama_cpp_ppl.py MODEL.gguf TEXT [max_tokens=2048] [window=512]

Prints one JSON line: {"ppl": ..., "tokens": ..., "scored": ..., "seconds": ...}. Loading the file at
all is the first check: llama.cpp rejects a GGUF with wrong metadata, types or shapes.
"""
import json
import os
import sys
import time

import numpy as np
from llama_cpp import Llama

path, text_path = sys.argv[1], sys.argv[2]
max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
window = int(sys.argv[4]) if len(sys.argv) > 4 else 512

llm = Llama(model_path=path, n_ctx=window, n_batch=window, logits_all=True, verbose=False,
            n_threads=int(os.environ.get("THREADS", os.cpu_count() or 1)), seed=0)
with open(text_path, encoding="utf-8") as f:
    text = f.read()
ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:max_tokens]
t0 = time.time()
nll, n = 0.0, 0
for start in range(0, len(ids), window):
    w = ids[start:start + window]
    if len(w) < 2:
        continue
    llm.reset()
    llm.eval(w)
    logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    nll -= sum(logp[i, w[i + 1]] for i in range(len(w) - 1))
    n += len(w) - 1
print(json.dumps({"ppl": float(np.exp(nll / n)), "tokens": len(ids), "scored": n,
                  "seconds": round(time.time() - t0, 2), "first_ids": ids[:8]}))
