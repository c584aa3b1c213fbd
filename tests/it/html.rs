//! report.html renders in headless Chromium: self-contained, charts drawn, no console errors.

use std::path::Path;
use std::process::Command;

use crate::util::{mcompress, recipe, repo, tmp};

fn chromium() -> Option<&'static str> {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return Some(c);
        }
    }
    assert!(std::env::var_os("CI").is_none(), "CI must install chromium (apt-get install chromium)");
    eprintln!("skipping: no chromium");
    None
}

fn headless(bin: &str, profile: &Path) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1000,1800",
    ]);
    c.arg(format!("--user-data-dir={}", profile.display()));
    c
}

#[test]
fn test_report_html_renders_charts_in_chromium() {
    let t = tmp();
    let out = t.path().join("dist");
    let extra = "\n[[target]]\nname = \"pi\"\nprofile = \"raspberry-pi-5-8gb\"\n\n[[target]]\nname = \"l4\"\nprofile = \"l4-24gb\"\nmax-size = \"auto\"\n";
    let r = recipe(t.path(), &repo().join("fixtures/digits-mlp"), &out, extra);
    let (code, so, se) = mcompress(&["run", "-q", r.to_str().unwrap()], t.path());
    assert_eq!(code, 0, "{so}{se}");
    let html_path = out.join("l4/report.html");
    let html = std::fs::read_to_string(&html_path).unwrap();
    // Self-contained and offline: no scripts, no external resources.
    assert!(
        !html.contains("<script") && !html.contains("http://") && !html.contains("https://") && !html.contains("<link")
    );
    for chart in ["size-per-target", "latency", "cost", "accuracy-vs-size"] {
        assert!(html.contains(&format!("data-chart=\"{chart}\"")), "{chart} chart missing");
    }
    let Some(bin) = chromium() else { return };

    let dom = headless(bin, &t.path().join("p1"))
        .arg("--dump-dom")
        .arg(format!("file://{}", html_path.display()))
        .output()
        .unwrap();
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    assert_eq!(dom_text.matches("data-chart=").count(), 4, "{}", String::from_utf8_lossy(&dom.stderr));
    assert!(dom_text.matches("<rect").count() >= 8, "bars present in the DOM");
    let stderr = String::from_utf8_lossy(&dom.stderr);
    assert!(!stderr.contains("Uncaught") && !stderr.contains("CONSOLE"), "console errors: {stderr}");

    let png_path = t.path().join("shot.png");
    let shot = headless(bin, &t.path().join("p2"))
        .arg(format!("--screenshot={}", png_path.display()))
        .arg(format!("file://{}", html_path.display()))
        .output()
        .unwrap();
    assert!(png_path.is_file(), "no screenshot: {}", String::from_utf8_lossy(&shot.stderr));
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png_path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let count = |rgb: [u8; 3]| {
        buf[..info.buffer_size()]
            .chunks_exact(px)
            .filter(|p| p[..3].iter().zip(rgb).all(|(a, b)| a.abs_diff(b) <= 6))
            .count()
    };
    // Bars of the speed chart (blue) and of the cost chart (orange) were painted.
    assert!(count([0x3b, 0x6f, 0xb6]) > 2000, "blue bars: {}", count([0x3b, 0x6f, 0xb6]));
    assert!(count([0xe0, 0xa0, 0x30]) > 2000, "orange bars: {}", count([0xe0, 0xa0, 0x30]));
}
