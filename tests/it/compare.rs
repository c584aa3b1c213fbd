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

#[test]
fn test_measured_latency_is_not_gated_across_backends() {
    // Two quickstart reports, the second as if its eval ran on another adapter: its 100x latency
    // is shown but not gated (different hardware), and the same latency on the same adapter fails.
    let t = tmp();
    let out = t.path().join("a");
    let recipe = repo().join("recipes/quickstart.toml");
    let (code, so, se) = mcompress(
        &["run", "-q", "--backend", "cpu", "--out", out.to_str().unwrap(), recipe.to_str().unwrap()],
        t.path(),
    );
    assert_eq!(code, 0, "{so}{se}");
    let old = out.join("default/report.json");
    let mut report: Value = serde_json::from_slice(&std::fs::read(&old).unwrap()).unwrap();
    let p50 = report["eval"]["latency_ms"]["compressed"]["p50"].as_f64().unwrap();
    report["eval"]["latency_ms"]["compressed"]["p50"] = (p50 * 100.0).into();
    let slower_same = t.path().join("same.json");
    std::fs::write(&slower_same, serde_json::to_vec(&report).unwrap()).unwrap();
    report["eval"]["backend"] = "wgpu".into();
    report["eval"]["adapter"] = "llvmpipe (LLVM 15.0.6, 256 bits); Cpu; Vulkan; Mesa 25.0.7".into();
    let slower_other = t.path().join("other.json");
    std::fs::write(&slower_other, serde_json::to_vec(&report).unwrap()).unwrap();
    let cmp = |new: &std::path::Path| {
        mcompress(&["compare", old.to_str().unwrap(), new.to_str().unwrap(), "--max-latency-growth", "10%"], t.path())
    };
    let (code, stdout, _) = cmp(&slower_same);
    assert_eq!(code, 1, "{stdout}");
    // Across adapters the measured latency is shown, not gated; with no target estimate to fall
    // back on, the latency limit cannot be judged, and a limit that cannot be judged fails.
    let (code, stdout, _) = cmp(&slower_other);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("eval latency p50 ms, not comparable: cpu (CPU"), "{stdout}");
    assert!(stdout.contains("vs wgpu (llvmpipe"), "{stdout}");
    assert!(stdout.contains("**FAIL (cannot evaluate: no value in both reports)**"), "{stdout}");
}

/// A hand-edited report: file name, the edit, compare's arguments, what the output must say.
type Case<'a> = (&'a str, &'a dyn Fn(&mut Value), &'a [&'a str], &'a str);

#[test]
fn test_compare_fails_limits_it_cannot_evaluate() {
    let t = tmp();
    let out = t.path().join("a");
    let recipe = repo().join("recipes/quickstart.toml");
    let (code, so, se) = mcompress(&["run", "-q", "--out", out.to_str().unwrap(), recipe.to_str().unwrap()], t.path());
    assert_eq!(code, 0, "{so}{se}");
    let old = out.join("default/report.json");
    let report: Value = serde_json::from_slice(&std::fs::read(&old).unwrap()).unwrap();
    let variant = |name: &str, edit: &dyn Fn(&mut Value)| {
        let mut r = report.clone();
        edit(&mut r);
        let p = t.path().join(name);
        std::fs::write(&p, serde_json::to_vec(&r).unwrap()).unwrap();
        p
    };
    let cmp = |new: &std::path::Path, args: &[&str]| {
        mcompress(&[&["compare", old.to_str().unwrap(), new.to_str().unwrap()][..], args].concat(), t.path())
    };
    // The same report passes every limit that can be judged.
    assert_eq!(cmp(&old, &["--max-accuracy-drop", "1%", "--max-size-growth", "0"]).0, 0);
    // No accuracy figure (eval not run, or a hand-edited report), a non-numeric one, another
    // metric, no size: the limit fails, naming why.
    let cases: [Case<'_>; 5] = [
        (
            "no-eval.json",
            &|r| r["eval"]["compressed"] = Value::Null,
            &["--max-accuracy-drop", "1%"],
            "no value in the new report",
        ),
        ("text.json", &|r| r["eval"]["compressed"] = "0.9".into(), &["--max-accuracy-drop", "1%"], "cannot evaluate"),
        (
            "metric.json",
            &|r| r["eval"]["metric"] = "perplexity".into(),
            &["--max-accuracy-drop", "1%"],
            "eval metric changed",
        ),
        (
            "no-eval-at-all.json",
            &|r| r.as_object_mut().unwrap().remove("eval").map_or((), |_| ()),
            &["--max-accuracy-drop", "1%"],
            "cannot evaluate",
        ),
        (
            "no-size.json",
            &|r| r["bundle"]["bytes"] = Value::Null,
            &["--max-size-growth", "5%"],
            "no value in the new report",
        ),
    ];
    for (name, edit, args, needle) in cases {
        let p = variant(name, edit);
        let (code, stdout, stderr) = cmp(&p, args);
        assert_eq!(code, 1, "{name}: {stdout}{stderr}");
        assert!(stdout.contains(needle) && stdout.contains("**FAIL"), "{name}: {stdout}");
        assert!(stdout.starts_with("### mcompress compare: FAIL"), "{name}: {stdout}");
    }
    // A FIFO given as a report: refused at once (exit 2), no hang.
    let fifo = t.path().join("fifo.json");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let (code, _, stderr) = cmp(&fifo, &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
}
