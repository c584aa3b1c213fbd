"""Loads an mcompress bundle with the real Python clients and measures it, printing one JSON object.

Run with the venv that scripts/hf-venv.sh builds (torch, transformers, compressed-tensors,
sentence-transformers, pinned). The Rust tests (tests/it/runtimes.rs) compare what it prints
with the bundle's own report.

  hf_load.py causal BUNDLE TEXT MAX_TOKENS WINDOW
      transformers AutoModelForCausalLM + AutoTokenizer: load report (missing / unexpected /
      mismatched weights), perplexity on the first MAX_TOKENS tokens of TEXT in non-overlapping
      windows of WINDOW tokens (as mcompress's eval), apply_chat_template, greedy continuation.
  hf_load.py encoder BUNDLE REFERENCE SENTENCES
      sentence-transformers on the bundle and on the reference model directory: mean cosine of
      the embeddings of each line of SENTENCES (mcompress's `cosine` metric).
  hf_load.py decompress BUNDLE DENSE
      compressed-tensors' own decompressor on every quantized module of the bundle, compared
      bit for bit with DENSE (the output of `mcompress dequantize`).
"""

import json
import logging
import math
import sys
import warnings


def quiet():
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("compressed_tensors").setLevel(logging.ERROR)


def causal(bundle, text_path, max_tokens, window):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundle)
    model, info = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32, output_loading_info=True)
    model.eval()
    if hasattr(model, "ct_decompress_hook"):
        # compressed-tensors decompresses on the first forward call. Its FP4 decompressors return
        # bfloat16 weights whatever the requested dtype (NVFP4/MXFP4 checkpoints of its own fail
        # in float32 with "expected m1 and m2 to have the same dtype"), so decompress with one
        # call under bfloat16 autocast, then run in float32 like the rest of the model.
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.tensor([[0, 1]]))
        model.to(torch.float32)
    text = open(text_path, encoding="utf-8").read()
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), window):
            w = ids[s : s + window]
            if len(w) < 2:
                break
            logits = model(torch.tensor([w])).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            target = torch.tensor(w[1:])
            nll -= logp.gather(1, target[:, None]).sum().item()
            count += len(w) - 1
    chat = None
    try:
        chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # reported, the test decides
        chat = f"ERROR: {type(e).__name__}: {e}"
    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    cont = tok.decode(out[0][prompt["input_ids"].shape[1] :])
    loading = {k: sorted(map(str, v)) for k, v in info.items()}
    return {
        "perplexity": math.exp(nll / max(count, 1)),
        "tokens": len(ids),
        "loading_info": loading,
        "chat_template": chat,
        "eos_token": tok.eos_token,
        "continuation": cont,
        "config_dtype": str(model.config.dtype),
    }


def encoder(bundle, reference, sentences_path):
    import torch
    from sentence_transformers import SentenceTransformer

    lines = [l.rstrip("\n") for l in open(sentences_path, encoding="utf-8") if l.strip()]
    ref = SentenceTransformer(reference, device="cpu", model_kwargs={"dtype": torch.float32})
    new = SentenceTransformer(bundle, device="cpu", model_kwargs={"dtype": torch.float32})
    # sentence-transformers 6.3 calls the transformers model's `forward` directly, which skips
    # the forward pre-hook compressed-tensors registers to decompress on the first call (any
    # compressed-tensors checkpoint fails with "'Linear' object has no attribute 'weight'").
    # One ordinary call through the module decompresses it; README documents this workaround.
    inner = getattr(new[0], "auto_model", None) or new[0].model
    if hasattr(inner, "ct_decompress_hook"):
        with torch.no_grad():
            inner(input_ids=torch.tensor([[101, 102]]), attention_mask=torch.tensor([[1, 1]]))
    a = ref.encode(lines, convert_to_tensor=True, batch_size=32).double()
    b = new.encode(lines, convert_to_tensor=True, batch_size=32).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return {
        "cosine": cos.mean().item(),
        "sentences": len(lines),
        "modules": [type(m).__name__ for m in new],
        "normalized": bool(torch.allclose(b.norm(dim=1), torch.ones(len(lines), dtype=torch.float64), atol=1e-5)),
    }


def decompress(bundle, dense_path):
    import torch
    from safetensors.torch import load_file
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    cfg = json.load(open(f"{bundle}/config.json"))
    qc = cfg["quantization_config"]
    packed = load_file(f"{bundle}/model.safetensors")
    dense = load_file(dense_path)
    modules, identical, worst = 0, 0, 0.0
    mismatched = []
    for gname, g in qc["config_groups"].items():
        scheme = QuantizationScheme(**{k: v for k, v in g.items() if k != "format"})
        fmt = g.get("format") or qc["format"]
        comp = BaseCompressor.get_value_from_registry(fmt)
        for m in g["targets"]:
            if m in qc.get("ignore", []):
                continue
            local = {k[len(m) + 1 :]: v for k, v in packed.items() if k.startswith(m + ".weight")}
            out = comp.decompress(local, scheme)
            w = out["weight"].contiguous()  # block-quantized FP8 comes back as a strided view
            ref = dense[m + ".weight"].contiguous()
            modules += 1
            same = w.dtype == ref.dtype and w.shape == ref.shape and torch.equal(w.view(-1).view(torch.int16 if w.element_size() == 2 else torch.int32), ref.view(-1).view(torch.int16 if ref.element_size() == 2 else torch.int32))
            if same:
                identical += 1
            else:
                mismatched.append(m)
                if w.shape == ref.shape:
                    worst = max(worst, (w.float() - ref.float()).abs().max().item())
    return {"modules": modules, "identical": identical, "mismatched": mismatched[:5], "max_abs_diff": worst}


def main():
    quiet()
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "causal":
        r = causal(args[0], args[1], int(args[2]), int(args[3]))
    elif mode == "encoder":
        r = encoder(args[0], args[1], args[2])
    elif mode == "decompress":
        r = decompress(args[0], args[1])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
