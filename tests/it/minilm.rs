//! The real all-MiniLM-L6-v2 (fetched by scripts/fetch-fixtures.sh): run the shipped recipes,
//! verify, and have Python's safetensors + numpy read and dequantize the bundle.

use std::process::Command;

use serde_json::Value;

use crate::util::{mcompress, minilm, repo, run_report, tmp};

#[test]
fn test_minilm_recipes_bundle_and_external_client_agrees() {
    let Some(model) = minilm() else { return };
    let t = tmp();
    for (recipe, target, max_rel) in [("minilm-int8", "cpu", 0.03), ("minilm-int4", "edge", 0.15)] {
        let out = t.path().join(recipe);
        let (code, so, se) = mcompress(
            &[
                "run",
                "-q",
                "--out",
                out.to_str().unwrap(),
                repo().join(format!("recipes/{recipe}.toml")).to_str().unwrap(),
            ],
            t.path(),
        );
        assert_eq!(code, 0, "{so}{se}");
        let b = out.join(target);
        assert_eq!(mcompress(&["verify", b.to_str().unwrap()], t.path()).0, 0);
        let report: Value = serde_json::from_slice(&std::fs::read(b.join("report.json")).unwrap()).unwrap();
        assert_eq!(report["model"]["params"], 22_713_728);
        // Embedding fidelity on fixtures/sentences.txt, reference vs bundle, gated by the recipe.
        assert_eq!(report["eval"]["status"], "ran", "{}", report["eval"]);
        assert_eq!(report["eval"]["samples"], 30);
        let fidelity = report["eval"]["compressed"].as_f64().unwrap();
        assert!(fidelity > 0.95 && fidelity < 1.0, "{recipe}: mean cosine {fidelity}");
        assert_eq!(report["eval"]["passed"], true);
        let q = &report["passes"][0];
        // 6 layers × 6 Linear + the pooler.
        assert_eq!(q["tensors"].as_array().unwrap().len(), 37);
        let rel = q["rel_rmse_max"].as_f64().unwrap();
        assert!(rel < max_rel, "{recipe}: {rel}");
        for f in ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"] {
            assert_eq!(std::fs::read(b.join(f)).unwrap(), std::fs::read(model.join(f)).unwrap(), "{f} copied");
        }

        let deq = t.path().join(format!("{recipe}.deq.safetensors"));
        let (code, so, se) = mcompress(&["dequantize", b.to_str().unwrap(), "--out", deq.to_str().unwrap()], t.path());
        assert_eq!(code, 0, "{so}{se}");
        let py = Command::new("python3")
            .arg(repo().join("tests/python/check_bundle.py"))
            .args([&b, &model.join("model.safetensors"), &deq])
            .output()
            .expect("python3 runs");
        let text = String::from_utf8_lossy(&py.stdout).into_owned() + &String::from_utf8_lossy(&py.stderr);
        if !py.status.success() && text.contains("ModuleNotFoundError") && std::env::var_os("CI").is_none() {
            eprintln!("skipping external client: {text}");
            continue;
        }
        assert!(py.status.success(), "{text}");
        assert!(text.contains("37 quantized matrices, 0 failure(s)"), "{text}");
    }
}

#[test]
fn test_minilm_reference_embeddings_match_sentence_transformers() {
    // The sentence-transformers README example: cosines 0.6660 / 0.1046 / 0.1411.
    let Some(model) = minilm() else { return };
    let src = mcompress_core::ModelSource::open(&model).unwrap();
    let bert = mcompress_eval::bert::Bert::load(
        src.config().unwrap(),
        &mcompress_eval::weights::from_model(&src),
        &mcompress_eval::linear::Device::Cpu,
    )
    .unwrap();
    let tok = mcompress_eval::load_tokenizer(&model.join("tokenizer.json")).unwrap();
    let e: Vec<Vec<f32>> = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
        .iter()
        .map(|s| bert.embed(tok.encode(*s, true).unwrap().get_ids()).unwrap())
        .collect();
    let cos = |i: usize, j: usize| mcompress_eval::bert::cosine(&e[i], &e[j]);
    for (got, want) in [(cos(0, 1), 0.6660), (cos(0, 2), 0.1046), (cos(1, 2), 0.1411)] {
        assert!((got - want).abs() < 1e-3, "cosine {got:.4}, sentence-transformers {want}");
    }
}

/// Runs MiniLM with one pass (TOML) and a Spearman eval on `set`; the report's eval object.
fn spearman_eval(model: &std::path::Path, set: &std::path::Path, pass: &str, eval_extra: &str) -> Value {
    let t = tmp();
    let recipe = t.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = {:?}\n[[pass]]\n{pass}\n[eval]\nset = {:?}\nmetric = \"spearman\"\n{eval_extra}\n",
            model.display().to_string(),
            set.display().to_string()
        ),
    )
    .unwrap();
    let report = run_report(t.path(), &recipe, &t.path().join("dist"), "default", &[]);
    assert_eq!(report["eval"]["status"], "ran", "{}", report["eval"]);
    report["eval"].clone()
}

#[test]
fn test_minilm_wordsim353_spearman_and_gate() {
    // Reference figure (numpy oracle, fixtures README): WordSim-353 Spearman 0.729.
    let Some(model) = minilm() else { return };
    let Some(set) = crate::util::fixture("gensim-test-data/wordsim353.tsv", "gensim") else { return };
    let pass = "type = \"quantize-rtn\"\nbits = 8\ntargets = [\"re:encoder\\\\..*\\\\.weight\"]";
    let e = spearman_eval(&model, &set, pass, "max-drop = 0.01");
    assert_eq!(e["samples"], 353);
    let reference = e["reference"].as_f64().unwrap();
    assert!((reference - 0.729).abs() < 0.005, "WordSim-353 Spearman {reference}");
    assert!((e["compressed"].as_f64().unwrap() - reference).abs() < 0.01, "{e}");
}

#[test]
fn test_eval_without_tokenizer_is_exit_2() {
    let Some(model) = minilm() else { return };
    let t = tmp();
    let copy = t.path().join("minilm-no-tokenizer");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(model.join(f), copy.join(f)).unwrap();
    }
    let recipe = t.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = {:?}\n[[pass]]\ntype = \"cast\"\ndtype = \"f16\"\n[eval]\nset = {:?}\nmetric = \"cosine\"\n",
            copy.display().to_string(),
            repo().join("fixtures/sentences.txt").display().to_string()
        ),
    )
    .unwrap();
    let out = t.path().join("dist");
    let (code, _, stderr) =
        mcompress(&["run", "-q", "--out", out.to_str().unwrap(), recipe.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("tokenizer.json: tokenizer missing"), "{stderr}");
    assert!(!out.join("default").exists());
}

#[test]
fn test_minilm_simlex999_spearman() {
    // Reference figure (numpy oracle, fixtures README): SimLex-999 Spearman 0.446.
    let Some(model) = minilm() else { return };
    let Some(set) = crate::util::fixture("gensim-test-data/simlex999.txt", "gensim") else { return };
    let e = spearman_eval(&model, &set, "type = \"cast\"\ndtype = \"f16\"", "backend = \"cpu\"\nmax-drop = 0.005");
    assert_eq!(e["samples"], 999, "{e}");
    let reference = e["reference"].as_f64().unwrap();
    assert!((reference - 0.446).abs() < 0.005, "SimLex-999 Spearman {reference}");
    assert_eq!(e["backend"], "cpu");
}
