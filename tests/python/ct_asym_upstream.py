# Reproduces an upstream limit the README notes: compressed-tensors 0.20.1 writes an asymmetric
# pack-quantized checkpoint of a tiny llama (zero points packed along dim 0, as ours), and
# transformers 5.25 refuses to load it (its meta model expects unpacked zero points). Run with the
# venv of scripts/hf-venv.sh from an empty directory; prints LOADS or FAILS.
import torch, json, os, warnings
warnings.filterwarnings("ignore")
from transformers import LlamaConfig, LlamaForCausalLM, AutoModelForCausalLM
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationArgs, apply_quantization_config, QuantizationStatus
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization.utils import calculate_qparams
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=100)
torch.manual_seed(0)
m = LlamaForCausalLM(cfg)
qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32))}, ignore=["lm_head"])
apply_quantization_config(m, qc)
# compute qparams with min/max per group
for name, mod in m.named_modules():
    if hasattr(mod, "quantization_scheme") and isinstance(mod, torch.nn.Linear):
        w = mod.weight.data
        g = w.reshape(w.shape[0], -1, 32)
        mn, mx = g.amin(-1), g.amax(-1)
        s, z = calculate_qparams(mn, mx, mod.quantization_scheme.weights)
        mod.weight_scale.data = s.to(mod.weight_scale.dtype); mod.weight_zero_point.data = z.to(mod.weight_zero_point.dtype)
comp = ModelCompressor.from_pretrained_model(m)
comp.compress_model(m)
m.save_pretrained("out")
comp.update_config("out")
from safetensors import safe_open
f = safe_open("out/model.safetensors", "pt")
print({k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if "q_proj" in k})
try:
    AutoModelForCausalLM.from_pretrained("out")
    print("LOADS")
except Exception as e:
    print("FAILS", type(e).__name__, str(e)[:200])
