#!/usr/bin/env python3
"""Oracle for mcompress's GGUF export: re-quantize every tensor of SOURCE.gguf with ggml's
reference quantizers and compare with the bytes of OURS.gguf (the export of SOURCE).

    ggml_oracle.py OURS.gguf SOURCE.gguf [LIBGGML_BASE.so]

Each tensor of OURS is looked up by name in SOURCE, dequantized by gguf-py (f32 values in GGUF
layout, Q/K already permuted as llama.cpp wants them), quantized to OURS's type and compared:
- by gguf-py's `gguf.quants.quantize` for the types it implements (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
  F16, F32, BF16): must be byte-identical;
- with a libggml-base shared library (llama-cpp-python ships one) by ggml itself,
  `ggml_quantize_chunk` without an importance matrix, for every type, k-quants included;
- otherwise (k-quants without libggml) gguf-py's dequantization of our bytes must be close to the
  source (relative RMSE within the type's expected error).
Also checks the metadata llama.cpp needs. Prints one JSON line and exits 1 on any mismatch.
"""
import ctypes
import json
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

ours_path, src_path = sys.argv[1], sys.argv[2]
lib = ctypes.CDLL(sys.argv[3]) if len(sys.argv) > 3 else None
if lib is not None:
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]

ours, src = GGUFReader(ours_path), GGUFReader(src_path)
src_t = {t.name: t for t in src.tensors}
PY = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.F16, T.F32, T.BF16}
TOL = {T.Q4_K: 0.15, T.Q5_K: 0.08, T.Q6_K: 0.04}
stats = {"py_exact": 0, "ggml_exact": 0, "close": 0, "mismatch": []}


def f32_of(t):
    x = dequantize(np.asarray(t.data), t.tensor_type)
    return np.ascontiguousarray(x.reshape(-1, int(t.shape[0])), dtype=np.float32)


def ggml_bytes(x, qtype, nbytes):
    out = np.zeros(nbytes, dtype=np.uint8)
    lib.ggml_quantize_init(int(qtype))
    rows, per_row = x.shape
    lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, per_row, None)
    return out


for t in ours.tensors:
    s = src_t[t.name]
    x = f32_of(s)
    got = np.asarray(t.data).view(np.uint8).reshape(-1)
    name = f"{t.name} ({t.tensor_type.name})"
    if t.tensor_type in PY:
        want = np.asarray(quantize(x, t.tensor_type)).view(np.uint8).reshape(-1)
        if np.array_equal(want, got):
            stats["py_exact"] += 1
        else:
            stats["mismatch"].append(f"{name}: gguf-py bytes differ at {int(np.argmax(want != got))}")
            continue
    if lib is not None and t.tensor_type not in (T.F32,):
        want = ggml_bytes(x, t.tensor_type, got.size)
        if np.array_equal(want, got):
            stats["ggml_exact"] += 1
        else:
            diff = int((want != got).sum())
            stats["mismatch"].append(f"{name}: ggml bytes differ in {diff} of {got.size}")
        continue
    if t.tensor_type in TOL:
        y = dequantize(np.asarray(t.data), t.tensor_type).reshape(x.shape)
        rel = float(np.sqrt(((y - x) ** 2).mean() / max((x ** 2).mean(), 1e-30)))
        if rel <= TOL[t.tensor_type]:
            stats["close"] += 1
        else:
            stats["mismatch"].append(f"{name}: relative RMSE {rel:.4f} > {TOL[t.tensor_type]}")

fields = {f.name: f for f in ours.fields.values()}
for key in ["general.architecture", "llama.block_count", "llama.embedding_length", "llama.attention.head_count",
            "llama.rope.dimension_count", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "general.file_type"]:
    if key not in fields:
        stats["mismatch"].append(f"metadata {key} missing")
stats["tensors"] = len(ours.tensors)
print(json.dumps(stats))
sys.exit(1 if stats["mismatch"] else 0)
