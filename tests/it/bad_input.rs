//! Bad input: exit 2, a message naming the file and the problem, no panic, nothing written.

use std::path::Path;

use crate::util::{mcompress, raw_safetensors, recipe, repo, tmp};

/// Runs a recipe over a model dir holding `weights` as model.safetensors; asserts exit 2, that
/// stderr names the file and contains `needle`, and that no bundle or temp dir was left.
fn assert_rejected(weights: &[u8], needle: &str) {
    let t = tmp();
    let model = t.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("model.safetensors"), weights).unwrap();
    let out = t.path().join("dist");
    let r = recipe(t.path(), &model, &out, "");
    let (code, stdout, stderr) = mcompress(&["run", "-q", r.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("model.safetensors"), "names the file: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_nothing_written(&out);
    // `inspect` refuses it the same way.
    let (code, _, stderr) = mcompress(&["inspect", model.join("model.safetensors").to_str().unwrap()], t.path());
    assert_eq!(code, 2);
    assert!(stderr.contains(needle), "{stderr}");
}

fn assert_nothing_written(out: &Path) {
    if out.exists() {
        let left: Vec<_> = std::fs::read_dir(out).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

const F32X2: &str = r#"{"w":{"dtype":"F32","shape":[2,1],"data_offsets":[0,8]}}"#;

#[test]
fn test_truncated_file() {
    assert_rejected(&[1, 0, 0], "truncated");
    let mut ok = raw_safetensors(F32X2, &[0; 8]);
    ok.truncate(ok.len() - 3);
    assert_rejected(&ok, "out of bounds");
}

#[test]
fn test_header_length_past_end() {
    let mut v = 4096u64.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    assert_rejected(&v, "header length 4096 is larger than");
}

#[test]
fn test_offsets_out_of_bounds() {
    let h = r#"{"w":{"dtype":"F32","shape":[2,1],"data_offsets":[0,80]}}"#;
    assert_rejected(&raw_safetensors(h, &[0; 8]), "out of bounds");
}

#[test]
fn test_overlapping_offsets() {
    let h = r#"{"a":{"dtype":"F32","shape":[2,1],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1,1],"data_offsets":[4,8]}}"#;
    assert_rejected(&raw_safetensors(h, &[0; 8]), "overlap");
}

#[test]
fn test_offsets_not_covering_data() {
    assert_rejected(&raw_safetensors(F32X2, &[0; 12]), "trailing bytes");
    let h = r#"{"w":{"dtype":"F32","shape":[2,1],"data_offsets":[4,12]}}"#;
    assert_rejected(&raw_safetensors(h, &[0; 12]), "belong to no tensor");
}

#[test]
fn test_unknown_dtype() {
    let h = r#"{"w":{"dtype":"F24","shape":[2,1],"data_offsets":[0,8]}}"#;
    assert_rejected(&raw_safetensors(h, &[0; 8]), "unknown dtype \"F24\"");
}

#[test]
fn test_shape_times_dtype_mismatch() {
    let h = r#"{"w":{"dtype":"F32","shape":[3,1],"data_offsets":[0,8]}}"#;
    assert_rejected(&raw_safetensors(h, &[0; 8]), "needs 12 bytes");
}

#[test]
fn test_non_utf8_header() {
    let mut v = 4u64.to_le_bytes().to_vec();
    v.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
    assert_rejected(&v, "not valid UTF-8");
}

#[test]
fn test_non_json_header() {
    assert_rejected(&raw_safetensors("{\"w\": nope}", &[]), "not valid safetensors JSON");
}

#[test]
fn test_duplicate_tensor_names() {
    let h = r#"{"w":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1,1],"data_offsets":[4,8]}}"#;
    assert_rejected(&raw_safetensors(h, &[0; 8]), "duplicate tensor name \"w\"");
}

#[test]
fn test_nan_weights_name_tensor_and_pass() {
    // [2, 32]: one group of 32 per row, a NaN in row 1.
    let h = r#"{"w.weight":{"dtype":"F32","shape":[2,32],"data_offsets":[0,256]}}"#;
    let mut data = Vec::new();
    for i in 0..64 {
        let v = if i == 40 { f32::NAN } else { i as f32 };
        data.extend_from_slice(&v.to_le_bytes());
    }
    let t = tmp();
    let model = t.path().join("m.safetensors");
    std::fs::write(&model, raw_safetensors(h, &data)).unwrap();
    let out = t.path().join("dist");
    let r = recipe(t.path(), &model, &out, "");
    let (code, _, stderr) = mcompress(&["run", "-q", r.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("pass[0] quantize-rtn: tensor \"w.weight\": row 1 contains NaN"), "{stderr}");
    assert_nothing_written(&out);
}

/// Writes `text` as a recipe next to a copy of nothing and runs it; returns stderr.
fn run_recipe_text(text: &str) -> (i32, String) {
    let t = tmp();
    let p = t.path().join("recipe.toml");
    std::fs::write(&p, text.replace("MODEL", &repo().join("fixtures/digits-mlp").display().to_string())).unwrap();
    let (code, _, stderr) =
        mcompress(&["run", "-q", "--out", t.path().join("o").to_str().unwrap(), p.to_str().unwrap()], t.path());
    assert!(!t.path().join("o").join("default").exists());
    (code, stderr)
}

#[test]
fn test_recipe_typo_names_file_line_pass_and_field() {
    let (code, e) = run_recipe_text(
        "[model]\npath = \"MODEL\"\n\n[[pass]]\ntype = \"cast\"\ndtype = \"f16\"\n\n[[pass]]\ntype = \"quantize-rtn\"\nbitz = 8\n",
    );
    assert_eq!(code, 2);
    assert!(e.contains("recipe.toml:10:1: pass[1] quantize-rtn: unknown field `bitz`, expected one of `bits`"), "{e}");
}

#[test]
fn test_recipe_wrong_type() {
    let (code, e) = run_recipe_text("[model]\npath = \"MODEL\"\n[[pass]]\ntype = \"quantize-rtn\"\nbits = \"8\"\n");
    assert_eq!(code, 2);
    assert!(e.contains("recipe.toml:5:8: pass[0] quantize-rtn: bits: invalid type: string \"8\""), "{e}");
    // Outside passes the key comes with its table.
    let (code, e) = run_recipe_text("[model]\npath = 5\n");
    assert_eq!(code, 2);
    assert!(e.contains("recipe.toml:2:8: model.path: invalid type: integer `5`"), "{e}");
    let (code, e) = run_recipe_text("[model]\npath = \"MODEL\"\n[eval]\nset = \"x\"\nmax-tokens = \"many\"\n");
    assert_eq!(code, 2);
    assert!(e.contains("eval.max-tokens: invalid type: string \"many\""), "{e}");
    let (code, e) = run_recipe_text("[model]\npath = \"MODEL\"\n[[pass]]\ntype = \"quantize-rtn\"\nbits = 5\n");
    assert_eq!(code, 2);
    assert!(e.contains("pass[0] quantize-rtn: bits = 5: supported values are 8, 4, 3 and 2"), "{e}");
}

#[test]
fn test_recipe_unknown_pass_type() {
    let (code, e) = run_recipe_text("[model]\npath = \"MODEL\"\n[[pass]]\ntype = \"quantise\"\n");
    assert_eq!(code, 2);
    assert!(
        e.contains(
            "recipe.toml:3:1: pass[0] quantise: unknown pass type \"quantise\"; valid types: cast, distill, prune-magnitude, prune-sparsegpt, prune-structured, prune-wanda, quantize-awq, quantize-fp4, quantize-fp8, quantize-gptq, quantize-rtn"
        ),
        "{e}"
    );
}

#[test]
fn test_recipe_unknown_section_and_bad_target() {
    let (code, e) = run_recipe_text("[model]\npath = \"MODEL\"\n[outptu]\ndir = \"x\"\n");
    assert_eq!(code, 2);
    assert!(e.contains("recipe.toml:3:2: unknown field `outptu`"), "{e}");
    let (code, e) = run_recipe_text("[model]\npath = \"MODEL\"\n[[target]]\nname = \"../escape\"\n");
    assert_eq!(code, 2);
    assert!(e.contains("target[0]: name \"../escape\""), "{e}");
}

#[test]
fn test_missing_model_path() {
    let (code, e) = run_recipe_text("[model]\npath = \"MODEL/../does-not-exist\"\n");
    assert_eq!(code, 2);
    assert!(e.contains("does-not-exist") && e.contains("No such file"), "{e}");
    let (code, e) = run_recipe_text("[model]\nfile = \"x\"\n");
    assert_eq!(code, 2);
    assert!(e.contains("recipe.toml:2:1: unknown field `file`, expected `path`"), "{e}");
    let (code, e) = run_recipe_text("[model]\npath = \"${MCOMPRESS_NO_SUCH_VAR}/m\"\n");
    assert_eq!(code, 2);
    assert!(e.contains("recipe.toml:2:8: model.path: environment variable MCOMPRESS_NO_SUCH_VAR is not set"), "{e}");
}

#[test]
fn test_output_over_input_is_refused() {
    let t = tmp();
    // The model sits where the bundle would go: dist/default.
    let model = t.path().join("dist").join("default");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(repo().join("fixtures/digits-mlp").join(f), model.join(f)).unwrap();
    }
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    let r = recipe(t.path(), &model, &t.path().join("dist"), "");
    let (code, _, stderr) = mcompress(&["run", "-q", r.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("would overwrite input file"), "{stderr}");
    assert_eq!(std::fs::read(model.join("model.safetensors")).unwrap(), before, "input untouched");
    // An output dir inside the model dir that overwrites nothing is fine.
    let r = recipe(t.path(), &model, &model.join("out"), "");
    assert_eq!(mcompress(&["run", "-q", r.to_str().unwrap()], t.path()).0, 0);
}

#[test]
fn test_dequantize_never_overwrites_its_input_or_a_bundle() {
    let t = tmp();
    let (code, so, se) =
        mcompress(&["run", "-q", "--out", "q", repo().join("recipes/quickstart.toml").to_str().unwrap()], t.path());
    assert!(code == 0 || code == 1, "{so}{se}");
    let bundle = t.path().join("q/default");
    let weights = bundle.join("model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let b = bundle.to_str().unwrap();
    // Its own weights, another file inside the bundle, a directory: refused, nothing changed.
    for (out, needle) in [
        (weights.clone(), "is the input file"),
        (bundle.join("dense.safetensors"), "inside the bundle"),
        (t.path().join("q"), "not a regular file"),
    ] {
        let (code, so, se) = mcompress(&["dequantize", b, "--out", out.to_str().unwrap()], t.path());
        assert_eq!(code, 2, "{so}{se}");
        assert!(se.contains(needle), "{needle}: {se}");
    }
    assert_eq!(std::fs::read(&weights).unwrap(), before, "bundle weights untouched");
    assert!(!bundle.join("dense.safetensors").exists());
    // A plain model file as its own output.
    let model = repo().join("fixtures/digits-mlp");
    let copy = t.path().join("m");
    std::fs::create_dir(&copy).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(model.join(f), copy.join(f)).unwrap();
    }
    let m = copy.join("model.safetensors");
    let (code, _, se) = mcompress(&["dequantize", m.to_str().unwrap(), "--out", m.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{se}");
    assert_eq!(std::fs::read(&m).unwrap(), std::fs::read(model.join("model.safetensors")).unwrap());
    // A temp file left by a killed run (a pid that no longer exists) is removed; no temp file of
    // this run stays behind.
    let stale = t.path().join(".dense.safetensors.mcompress-tmp-4194999");
    std::fs::write(&stale, b"partial").unwrap();
    let dense = t.path().join("dense.safetensors");
    let (code, so, se) = mcompress(&["dequantize", b, "--out", dense.to_str().unwrap()], t.path());
    assert_eq!(code, 0, "{so}{se}");
    assert!(!stale.exists(), "stale temp file removed");
    let left: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.contains("mcompress-tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
