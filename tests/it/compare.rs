//! `mcompress compare`: diffs two runs and gates on regressions.

use serde_json::Value;

use crate::util::{mcompress, repo, tmp};

#[test]
fn test_compare_gates_size_growth_and_lost_fit() {
    let t = tmp();
    let model = repo().join("fixtures/digits-mlp");
    let write = |name: &str, bits: u8, max: &str| {
        let text = format!(
            "[model]\npath = {:?}\n[[pass]]\ntype = \"quantize-rtn\"\nbits = {bits}\ngroup-size = 32\n[[target]]\nname = \"pi\"\nprofile = \"raspberry-pi-5-8gb\"\n[[target]]\nname = \"tight\"\nprofile = \"t4-16gb\"\nmemory = {max:?}\noverhead = \"0\"\n",
            model.display().to_string()
        );
        let p = t.path().join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        let out = t.path().join(name);
        let (code, so, se) = mcompress(&["run", "-q", "--out", out.to_str().unwrap(), p.to_str().unwrap()], t.path());
        assert_eq!(code, 0, "{so}{se}");
        out
    };
    // A 16 KiB "device": int4 weights (12.2 KiB) fit, int8 (20.5 KiB) do not.
    let int4 = write("int4", 4, "16KiB");
    let int8 = write("int8", 8, "16KiB");

    let (code, stdout, _) = mcompress(
        &["compare", int8.join("pi").to_str().unwrap(), int4.join("pi").to_str().unwrap(), "--max-size-growth", "5%"],
        t.path(),
    );
    assert_eq!(code, 0, "shrinking passes: {stdout}");
    assert!(stdout.starts_with("### mcompress compare: PASS"), "{stdout}");

    let (code, stdout, _) = mcompress(
        &["compare", int4.join("pi").to_str().unwrap(), int8.join("pi").to_str().unwrap(), "--max-size-growth", "5%"],
        t.path(),
    );
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("| bundle bytes |") && stdout.contains("**FAIL**"), "{stdout}");
    assert!(stdout.contains("tight: fits (1 yes, 0 no) | 1 | 0 |"), "{stdout}");

    // An absolute size budget, and JSON output.
    let (code, stdout, _) = mcompress(
        &[
            "compare",
            int4.join("pi/report.json").to_str().unwrap(),
            int8.join("pi").to_str().unwrap(),
            "--max-size-growth",
            "1MiB",
            "--json",
        ],
        t.path(),
    );
    assert_eq!(code, 1, "the lost fit still fails");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["passed"], false);
    assert_eq!(v["rows"][0]["check"], "PASS");

    // Bad input.
    let (code, _, stderr) = mcompress(
        &[
            "compare",
            repo().join("fixtures/digits-mlp/config.json").to_str().unwrap(),
            int8.join("pi").to_str().unwrap(),
        ],
        t.path(),
    );
    assert_eq!(code, 2);
    assert!(stderr.contains("not an mcompress report"), "{stderr}");
    let (code, _, stderr) = mcompress(&["compare", "nope", int8.join("pi").to_str().unwrap()], t.path());
    assert_eq!(code, 2);
    assert!(stderr.contains("nope"), "{stderr}");
    let (code, _, stderr) = mcompress(&["compare", "a", "b", "--max-size-growth", "lots"], t.path());
    assert_eq!(code, 2);
    assert!(stderr.contains("expected a percentage"), "{stderr}");
}
