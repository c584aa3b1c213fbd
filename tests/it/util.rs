use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `mcompress run -q [extra…] --out OUT RECIPE` from `cwd`, which must exit 0; the report.json
/// of `target`.
pub(crate) fn run_report(cwd: &Path, recipe: &Path, out: &Path, target: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["run", "-q"];
    args.extend_from_slice(extra);
    args.extend(["--out", out.to_str().unwrap(), recipe.to_str().unwrap()]);
    let (code, so, se) = mcompress(&args, cwd);
    assert_eq!(code, 0, "{so}{se}");
    serde_json::from_slice(&std::fs::read(out.join(target).join("report.json")).unwrap()).unwrap()
}

/// Runs the binary; returns (exit code, stdout, stderr).
pub(crate) fn mcompress(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_mcompress"))
        .args(args)
        .current_dir(cwd)
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `body` to `dir/name`; the path.
pub(crate) fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// A fresh temp dir per test.
pub(crate) fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Quickstart-like recipe over `model` writing to `out`.
pub(crate) fn recipe(dir: &Path, model: &Path, out: &Path, extra: &str) -> PathBuf {
    let text = format!(
        "[model]\npath = {:?}\n\n[[pass]]\ntype = \"quantize-rtn\"\nbits = 4\ngroup-size = 32\nsymmetric = false\n\n[[pass]]\ntype = \"cast\"\ndtype = \"bf16\"\n\n[output]\ndir = {:?}\n{extra}",
        model.display().to_string(),
        out.display().to_string()
    );
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// Every file under `dir` with its bytes, sorted.
pub(crate) fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        v.push((e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()));
    }
    v.sort();
    v
}

/// Raw safetensors bytes from a header and data.
pub(crate) fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

/// A fetched fixture under the cache (`scripts/fetch-fixtures.sh NAME`); in CI it must exist.
pub(crate) fn fixture(rel: &str, fetch: &str) -> Option<PathBuf> {
    let base = std::env::var_os("MCOMPRESS_FIXTURES").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/mcompress/fixtures"),
        PathBuf::from,
    );
    let p = base.join(rel);
    if p.exists() {
        return Some(p);
    }
    assert!(std::env::var_os("CI").is_none(), "CI must fetch {rel} first (scripts/fetch-fixtures.sh {fetch})");
    eprintln!("skipping: {rel} not fetched (scripts/fetch-fixtures.sh {fetch})");
    None
}

/// Directory of the MiniLM fixture.
pub(crate) fn minilm() -> Option<PathBuf> {
    fixture("all-MiniLM-L6-v2/model.safetensors", "minilm").map(|p| p.parent().unwrap().to_path_buf())
}
