//! Signed bundles: keygen, run --sign, verify --key.

use crate::util::{mcompress, recipe, repo, snapshot, tmp};

#[test]
fn test_signed_bundle_verifies_and_detects_tampering() {
    let t = tmp();
    let key = t.path().join("release.key");
    let (code, stdout, stderr) = mcompress(&["keygen", "--out", key.to_str().unwrap()], t.path());
    assert_eq!(code, 0, "{stdout}{stderr}");
    let public = t.path().join("release.key.pub");
    assert!(std::fs::read_to_string(&key).unwrap().starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(std::fs::read_to_string(&public).unwrap().starts_with("-----BEGIN PUBLIC KEY-----"));
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }
    // keygen never overwrites a key.
    assert_eq!(mcompress(&["keygen", "--out", key.to_str().unwrap()], t.path()).0, 2);

    let r = recipe(t.path(), &repo().join("fixtures/digits-mlp"), &t.path().join("unused"), "");
    let mut snaps = Vec::new();
    for (i, threads) in ["1", "2"].iter().enumerate() {
        let out = t.path().join(format!("out{i}"));
        let args = [
            "run",
            "-q",
            "--reproducible",
            "--threads",
            threads,
            "--sign",
            key.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            r.to_str().unwrap(),
        ];
        let (code, so, se) = mcompress(&args, t.path());
        assert_eq!(code, 0, "{so}{se}");
        snaps.push(snapshot(&out.join("default")));
    }
    assert!(snaps[0] == snaps[1], "signed bundles are byte-identical, signature included");
    assert!(snaps[0].iter().any(|(n, _)| n == "manifest.sig"));

    let b = t.path().join("out0/default");
    let verify =
        |k: &std::path::Path| mcompress(&["verify", b.to_str().unwrap(), "--key", k.to_str().unwrap()], t.path());
    let (code, stdout, _) = verify(&public);
    assert_eq!(code, 0, "{stdout}");

    // OpenSSL verifies the same signature with the same public key file.
    if std::process::Command::new("openssl").arg("version").output().is_ok() {
        let hex = std::fs::read_to_string(b.join("manifest.sig")).unwrap();
        let raw = hex::decode(hex.trim()).unwrap();
        std::fs::write(t.path().join("sig.bin"), raw).unwrap();
        let o = std::process::Command::new("openssl")
            .args(["pkeyutl", "-verify", "-pubin", "-inkey"])
            .arg(&public)
            .args(["-rawin", "-in"])
            .arg(b.join("manifest.json"))
            .arg("-sigfile")
            .arg(t.path().join("sig.bin"))
            .output()
            .unwrap();
        assert!(o.status.success(), "openssl: {}", String::from_utf8_lossy(&o.stderr));
    }

    // Another key.
    let other = t.path().join("other.key");
    assert_eq!(mcompress(&["keygen", "--out", other.to_str().unwrap()], t.path()).0, 0);
    let (code, stdout, _) = verify(&t.path().join("other.key.pub"));
    assert_eq!(code, 1);
    assert!(stdout.contains("signature does not match"), "{stdout}");

    // A manifest edited to match tampered content no longer matches the signature.
    let mpath = b.join("manifest.json");
    let original = std::fs::read(&mpath).unwrap();
    let edited = String::from_utf8(original.clone()).unwrap().replace("\"passed\"", "\"failed\"");
    std::fs::write(&mpath, edited).unwrap();
    let (code, stdout, _) = verify(&public);
    assert_eq!(code, 1);
    assert!(stdout.contains("signature does not match"), "{stdout}");
    std::fs::write(&mpath, &original).unwrap();

    // A flipped byte in a file is caught by the hashes the signature covers.
    let cfg = b.join("config.json");
    let mut bytes = std::fs::read(&cfg).unwrap();
    bytes[5] ^= 0x20;
    std::fs::write(&cfg, &bytes).unwrap();
    let (code, stdout, _) = verify(&public);
    assert_eq!(code, 1);
    assert!(stdout.contains("config.json: sha256"), "{stdout}");
    bytes[5] ^= 0x20;
    std::fs::write(&cfg, &bytes).unwrap();

    // A renamed file: one missing, one unexpected.
    std::fs::rename(b.join("report.md"), b.join("report.txt")).unwrap();
    let (code, stdout, _) = verify(&public);
    assert_eq!(code, 1);
    assert!(stdout.contains("report.md: missing") && stdout.contains("report.txt: not listed"), "{stdout}");
    std::fs::rename(b.join("report.txt"), b.join("report.md")).unwrap();
    assert_eq!(verify(&public).0, 0);

    // An unsigned bundle fails verification with a key.
    std::fs::remove_file(b.join("manifest.sig")).unwrap();
    let (code, stdout, _) = verify(&public);
    assert_eq!(code, 1);
    assert!(stdout.contains("manifest.sig: missing"), "{stdout}");

    // A file that is not a key is bad input.
    let (code, _, stderr) = mcompress(&["verify", b.to_str().unwrap(), "--key", r.to_str().unwrap()], t.path());
    assert_eq!(code, 2);
    assert!(stderr.contains("not an Ed25519 SPKI PEM public key"), "{stderr}");
}
