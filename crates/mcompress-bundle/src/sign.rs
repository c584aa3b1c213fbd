//! Ed25519 signatures over `manifest.json`. The manifest holds the sha256 and size of every
//! bundle file, so one signature covers the whole bundle; `verify --key` checks the signature and
//! then every hash. Ed25519 signing is deterministic, so signed bundles stay byte-identical.
//! Keys are PKCS#8 / SPKI PEM files, readable by OpenSSL.

use std::path::Path;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::{Error, Result, io};

/// File holding the hex signature of `manifest.json`.
pub const SIGNATURE_FILE: &str = "manifest.sig";

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadBundle { path: path.to_path_buf(), reason: reason.into() }
}

/// Generates a key pair: `secret` (PKCS#8 PEM, mode 0600) and `<secret>.pub` (SPKI PEM).
/// Refuses to overwrite existing files. Returns the public key path.
pub fn keygen(secret: &Path) -> Result<std::path::PathBuf> {
    let public =
        secret.with_file_name(format!("{}.pub", secret.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    for p in [secret, public.as_path()] {
        if p.exists() {
            return Err(bad(p, "already exists; refusing to overwrite a key"));
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| bad(secret, format!("no system randomness: {e}")))?;
    let key = SigningKey::from_bytes(&seed);
    let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| bad(secret, e.to_string()))?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(secret).map_err(io(secret))?;
        f.write_all(pem.as_bytes()).map_err(io(secret))?;
    }
    let pub_pem = key.verifying_key().to_public_key_pem(LineEnding::LF).map_err(|e| bad(&public, e.to_string()))?;
    fs_err::write(&public, pub_pem).map_err(io(&public))?;
    Ok(public)
}

/// A key or signature file: a regular UTF-8 file of at most `limit` bytes.
fn read_text(path: &Path, limit: u64) -> Result<String> {
    let bytes = mcompress_core::fsutil::read_regular(path, limit).map_err(io(path))?;
    String::from_utf8(bytes).map_err(|_| bad(path, "not UTF-8 text".to_string()))
}

/// Reads a PKCS#8 PEM secret key.
pub fn load_signing_key(path: &Path) -> Result<SigningKey> {
    let text = read_text(path, 1 << 20)?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| bad(path, format!("not an Ed25519 PKCS#8 PEM secret key: {e}")))
}

/// Reads an SPKI PEM public key.
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey> {
    let text = read_text(path, 1 << 20)?;
    VerifyingKey::from_public_key_pem(&text).map_err(|e| bad(path, format!("not an Ed25519 SPKI PEM public key: {e}")))
}

/// Signs `dir/manifest.json` into `dir/manifest.sig`.
pub fn sign_bundle(dir: &Path, key: &SigningKey) -> Result<()> {
    let mpath = dir.join("manifest.json");
    let manifest = crate::read_json_file(&mpath).map_err(io(&mpath))?;
    let sig = key.sign(&manifest);
    let mut text = hex::encode(sig.to_bytes());
    text.push('\n');
    mcompress_core::fsutil::write_atomic(&dir.join(SIGNATURE_FILE), text.as_bytes())?;
    Ok(())
}

/// Checks `dir/manifest.sig` against `dir/manifest.json` with `key`. `Ok(Some(reason))` when the
/// signature is missing, malformed or does not verify.
pub fn check_signature(dir: &Path, key: &VerifyingKey) -> Result<Option<String>> {
    let mpath = dir.join("manifest.json");
    let manifest = crate::read_json_file(&mpath).map_err(io(&mpath))?;
    let spath = dir.join(SIGNATURE_FILE);
    let Ok(text) = read_text(&spath, 1 << 20) else {
        return Ok(Some(format!("{SIGNATURE_FILE}: missing (the bundle is not signed)")));
    };
    let Some(bytes) = hex::decode(text.trim()).ok().and_then(|b| <[u8; 64]>::try_from(b).ok()) else {
        return Ok(Some(format!("{SIGNATURE_FILE}: not a hex Ed25519 signature")));
    };
    let sig = Signature::from_bytes(&bytes);
    Ok(key
        .verify_strict(&manifest, &sig)
        .err()
        .map(|_| format!("{SIGNATURE_FILE}: signature does not match manifest.json for this key")))
}
