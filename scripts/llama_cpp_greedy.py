#!/usr/bin/env python3
"""Greedy decoding with llama.cpp itself (PyPI llama-cpp-python): the oracle for mcompress's
decoder on the same GGUF.

    llama_cpp_greedy.py MODEL.gguf PROMPT STEPS

Tokenizes PROMPT as llama.cpp does (BOS when the file says add_bos_token), then takes the argmax
token STEPS times, each from the full sequence so far. Prints one JSON line:
{"prompt_ids": [...], "ids": [...], "text": "..."}.
"""
import json
import os
import sys

import numpy as np
from llama_cpp import Llama

path, prompt, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=256, n_batch=256, logits_all=True, verbose=False,
            n_threads=int(os.environ.get("THREADS", os.cpu_count() or 1)), seed=0)
ids = llm.tokenize(prompt.encode("utf-8"), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true",
                   special=False)
prompt_ids = list(ids)
for _ in range(steps):
    llm.reset()
    llm.eval(ids)
    ids.append(int(np.argmax(np.asarray(llm.scores[len(ids) - 1]))))
print(json.dumps({"prompt_ids": prompt_ids, "ids": ids[len(prompt_ids):],
                  "text": llm.detokenize(ids[len(prompt_ids):]).decode("utf-8", "replace")}))
