#!/usr/bin/env python3
"""Write a synthetic BF16 llama-shaped model for benchmarks (no download needed).

    gen_synthetic.py OUT_DIR [--preset tinyllama-1.1b|llama-7b|mixtral-synth|qwen3-moe-synth]

tinyllama-1.1b: hidden 2048, intermediate 5632, 22 layers, 32 heads / 4 KV heads, vocab 32000
(1.1B parameters, ~2.2 GB). llama-7b: hidden 4096, intermediate 11008, 32 layers, vocab 32000
(6.7B, ~13.5 GB). mixtral-synth: a mixture of experts in Mixtral's layout with Qwen3-MoE-like
expert shapes (hidden 2048, 24 layers, 32 heads / 4 KV heads, 32 experts of width 768 per block,
4 per token; SmolLM2's vocabulary size 49152 so that scripts/bench-moe.sh can give it SmolLM2's
tokenizer, which llama.cpp's pre-tokenizer table knows; 4.1B parameters, ~8.2 GB, largest tensor
the 201 MB embedding). qwen3-moe-synth: Qwen3-30B-A3B's layout and geometry (qwen3_moe, hidden 2048,
48 layers, 32 heads of 128 / 4 KV heads, q/k norms, vocab 151936, experts of width 768, 8 per
token) with 64 experts per block instead of 128: 16.0B parameters, ~32 GB, larger than a 24 GiB
machine's memory; largest tensor the 622 MB embedding. Weights are N(0, 0.02) with a few outliers, written tensor by tensor (memory
stays at one tensor), seeded, as model.safetensors + config.json, plus a byte-level BPE
tokenizer.json of the vocabulary's size (256 byte tokens, the rest placeholders; no merges) so
the GGUF export has a tokenizer to embed.

    gen_synthetic.py OUT_DIR --tokenizer-only     (add tokenizer.json to an existing model)
"""
import json
import os
import sys

import numpy as np

PRESETS = {
    "tinyllama-1.1b": dict(hidden=2048, inter=5632, layers=22, heads=32, kv=4, vocab=32000),
    "llama-7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv=32, vocab=32000),
    "mixtral-synth": dict(hidden=2048, inter=768, layers=24, heads=32, kv=4, vocab=49152, experts=32, used=4),
    # Qwen3-30B-A3B's geometry with half its experts (64 of 128): larger than a 24 GiB machine.
    "qwen3-moe-synth": dict(hidden=2048, inter=768, layers=48, heads=32, kv=4, vocab=151936, experts=64, used=8,
                            head_dim=128, qwen3=True),
}


def tensors(p):
    h, i = p["hidden"], p["inter"]
    hd = p.get("head_dim", h // p["heads"])
    q = p["heads"] * hd
    yield "model.embed_tokens.weight", (p["vocab"], h)
    for l in range(p["layers"]):
        pre = f"model.layers.{l}."
        yield pre + "input_layernorm.weight", (h,)
        yield pre + "self_attn.q_proj.weight", (q, h)
        yield pre + "self_attn.k_proj.weight", (p["kv"] * hd, h)
        yield pre + "self_attn.v_proj.weight", (p["kv"] * hd, h)
        yield pre + "self_attn.o_proj.weight", (h, q)
        yield pre + "post_attention_layernorm.weight", (h,)
        if p.get("qwen3"):
            yield pre + "self_attn.q_norm.weight", (hd,)
            yield pre + "self_attn.k_norm.weight", (hd,)
        if "experts" in p:
            # Router and experts in file order: Mixtral's w1 (gate), w2 (down), w3 (up);
            # Qwen3-MoE's gate, up, down.
            router, experts = ("mlp.gate", "mlp.experts.{}.") if p.get("qwen3") else ("block_sparse_moe.gate", "block_sparse_moe.experts.{}.")
            parts = [("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))] if p.get("qwen3") else [("w1", (i, h)), ("w2", (h, i)), ("w3", (i, h))]
            yield pre + router + ".weight", (p["experts"], h)
            for e in range(p["experts"]):
                for name, shape in parts:
                    yield pre + experts.format(e) + name + ".weight", shape
            continue
        yield pre + "mlp.gate_proj.weight", (i, h)
        yield pre + "mlp.up_proj.weight", (i, h)
        yield pre + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (p["vocab"], h)


def byte_tokens():
    """GPT-2's bytes_to_unicode alphabet: the 256 byte-level BPE base tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(out, vocab):
    tokens = byte_tokens() + [f"<synthetic_{i}>" for i in range(256, vocab)]
    tok = {"version": "1.0", "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
           "post_processor": None,
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": []}}
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tok, f)


def main():
    out = sys.argv[1]
    if sys.argv[2:3] == ["--tokenizer-only"]:
        with open(os.path.join(out, "config.json")) as f:
            write_tokenizer(out, json.load(f)["vocab_size"])
        return
    preset = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--preset" else "tinyllama-1.1b"
    p = PRESETS[preset]
    os.makedirs(out, exist_ok=True)
    entries, offset = {}, 0
    specs = list(tensors(p))
    for name, shape in specs:
        n = int(np.prod(shape)) * 2
        entries[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % 8)
    rng = np.random.default_rng(7)
    tmp = os.path.join(out, "model.safetensors.partial")
    with open(tmp, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for name, shape in specs:
            rows = shape[0]
            step = max(1, (1 << 24) // int(np.prod(shape[1:]) or 1))
            for r in range(0, rows, step):
                sub = (min(step, rows - r),) + tuple(shape[1:])
                if len(shape) == 1:
                    x = 1.0 + 0.05 * rng.standard_normal(sub, dtype=np.float32)
                else:
                    x = 0.02 * rng.standard_normal(sub, dtype=np.float32)
                    x.reshape(-1)[::997] *= 8.0
                f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    os.replace(tmp, os.path.join(out, "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": p["hidden"],
        "intermediate_size": p["inter"], "num_hidden_layers": p["layers"], "num_attention_heads": p["heads"],
        "num_key_value_heads": p["kv"], "vocab_size": p["vocab"], "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "synthetic": preset,
    }
    if p.get("qwen3"):
        config.update({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "head_dim": p["head_dim"],
                       "num_experts": p["experts"], "num_experts_per_tok": p["used"], "moe_intermediate_size": p["inter"],
                       "intermediate_size": 6144, "norm_topk_prob": True, "decoder_sparse_step": 1,
                       "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                       "attention_bias": False})
    elif "experts" in p:
        config.update({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                       "num_local_experts": p["experts"], "num_experts_per_tok": p["used"], "sliding_window": None})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_tokenizer(out, p["vocab"])
    print(f"{out}: {sum(int(np.prod(s)) for _, s in specs):,} parameters, {offset + 8 + len(header):,} bytes")


if __name__ == "__main__":
    main()
