//! Crash safety: a run killed with SIGKILL at any moment leaves no bundle that `verify` accepts
//! (and nothing that looks complete); the next run cleans up and succeeds.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use crate::util::{mcompress, raw_safetensors, tmp};

#[test]
fn test_sigkill_mid_run_leaves_no_accepted_bundle() {
    let t = tmp();
    // 4 matrices of 1024 x 4096 F32 (64 MiB): long enough to be killed while writing.
    let model = t.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let (rows, cols) = (1024usize, 4096usize);
    let n = rows * cols * 4;
    let mut header = String::from("{");
    for i in 0..4 {
        let _ = write!(
            header,
            "\"l{i}.weight\":{{\"dtype\":\"F32\",\"shape\":[{rows},{cols}],\"data_offsets\":[{},{}]}}",
            i * n,
            (i + 1) * n
        );
        header += if i < 3 { "," } else { "}" };
    }
    let data: Vec<u8> = (0..4 * rows * cols).flat_map(|i| ((i % 977) as f32 * 1e-3 - 0.4).to_le_bytes()).collect();
    std::fs::write(model.join("model.safetensors"), raw_safetensors(&header, &data)).unwrap();
    let recipe = t.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = {:?}\n[[pass]]\ntype = \"quantize-rtn\"\nbits = 4\ngroup-size = 64\n",
            model.display().to_string()
        ),
    )
    .unwrap();
    let out = t.path().join("dist");
    let bundle = out.join("default");

    for delay_ms in [5u64, 30, 80, 150, 300] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mcompress"))
            .args(["run", "-q", "--out", out.to_str().unwrap(), recipe.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if bundle.exists() {
            // Either the run finished before the kill, or an earlier complete bundle is still in
            // place: both must verify. A partial bundle at the final path must never appear.
            let (code, stdout, stderr) = mcompress(&["verify", bundle.to_str().unwrap()], t.path());
            assert_eq!(code, 0, "after SIGKILL at {delay_ms} ms ({status}): {stdout}{stderr}");
        }
    }
    // The next run succeeds and leaves exactly one bundle, no temp dirs.
    let (code, so, se) = mcompress(&["run", "-q", "--out", out.to_str().unwrap(), recipe.to_str().unwrap()], t.path());
    assert_eq!(code, 0, "{so}{se}");
    let names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["default"]);
    assert_eq!(mcompress(&["verify", bundle.to_str().unwrap()], t.path()).0, 0);
}
