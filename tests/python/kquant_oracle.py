#!/usr/bin/env python3
"""Oracle for GGUF block types: write a small llama-named GGUF whose tensors hold random blocks of
every type our reader supports (valid finite f16 scales, random quants), and the same tensors as
ggml's Python reader (gguf-py) dequantizes them, as F32 safetensors under Hugging Face names.

    kquant_oracle.py OUT_DIR        -> OUT_DIR/blocks.gguf, OUT_DIR/reference.safetensors
"""
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize
from safetensors.numpy import save_file

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(11)
# (gguf name, HF name, type); ffn tensors need no Q/K un-permutation.
kinds = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.F16, T.BF16, T.F32]
names = ["ffn_up", "ffn_down", "ffn_gate", "attn_v", "attn_output"]
w = GGUFWriter(os.path.join(out, "blocks.gguf"), "llama")
w.add_block_count(len(kinds))
w.add_embedding_length(256)
w.add_feed_forward_length(256)
w.add_head_count(4)
w.add_head_count_kv(4)
w.add_context_length(64)
w.add_layer_norm_rms_eps(1e-5)
ref = {}
for i, ty in enumerate(kinds):
    block, nbytes = GGML_QUANT_SIZES[ty]
    rows, cols = 3, 512
    n_blocks = rows * cols // block
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    # Every f16 scale field gets a finite value (random bytes could be NaN/inf).
    def f16(shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float16).view(np.uint8).reshape(shape[0], -1)
    if ty in (T.Q4_0, T.Q5_0, T.Q8_0):
        raw[:, 0:2] = f16((n_blocks, 1))
    elif ty in (T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K):
        raw[:, 0:4] = f16((n_blocks, 2))
    elif ty == T.Q6_K:
        raw[:, -2:] = f16((n_blocks, 1))
    elif ty == T.F16:
        raw = f16((n_blocks, 1))
    elif ty == T.BF16:
        raw = (rng.standard_normal(n_blocks).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
    elif ty == T.F32:
        raw = rng.standard_normal(n_blocks).astype(np.float32).view(np.uint8).reshape(n_blocks, 4)
    name = f"blk.{i}.{names[i % len(names)]}.weight"
    w.add_tensor(name, raw.reshape(rows, -1), raw_dtype=ty)
    hf = {"ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_gate": "mlp.gate_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj"}[names[i % len(names)]]
    ref[f"model.layers.{i}.{hf}.weight"] = np.ascontiguousarray(dequantize(raw.reshape(-1), ty).astype(np.float32).reshape(rows, cols))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
save_file(ref, os.path.join(out, "reference.safetensors"))
print("wrote", len(ref), "tensors of types", [k.name for k in kinds])
