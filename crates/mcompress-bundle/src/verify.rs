//! `mcompress verify`: re-hash a bundle against its manifest.

use std::fmt;
use std::path::Path;

use crate::manifest::{Manifest, hash_dir};
use crate::{Error, MANIFEST_SCHEMA, Result, io};

/// A difference between a bundle and its manifest.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Problem {
    /// Listed in the manifest, absent on disk.
    Missing {
        /// File.
        file: String,
    },
    /// On disk, not in the manifest.
    Unexpected {
        /// File.
        file: String,
    },
    /// `manifest.sig` is missing or does not verify with the given key.
    Signature {
        /// Why.
        reason: String,
    },
    /// Content differs.
    Modified {
        /// File.
        file: String,
        /// sha256 in the manifest.
        expected: String,
        /// sha256 on disk.
        actual: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Missing { file } => write!(f, "{file}: missing (listed in manifest.json)"),
            Problem::Unexpected { file } => write!(f, "{file}: not listed in manifest.json"),
            Problem::Signature { reason } => f.write_str(reason),
            Problem::Modified { file, expected, actual } => {
                write!(f, "{file}: sha256 {actual} does not match manifest {expected}")
            }
        }
    }
}

/// Reads `dir/manifest.json` and compares every file. `Ok(vec![])` means the bundle is intact;
/// an unreadable or malformed manifest is an error.
pub fn verify(dir: &Path) -> Result<(Manifest, Vec<Problem>)> {
    let mpath = dir.join("manifest.json");
    if !dir.is_dir() {
        return Err(Error::BadBundle { path: dir.into(), reason: "not a directory".into() });
    }
    let text = fs_err::read(&mpath).map_err(io(&mpath))?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| Error::BadBundle { path: mpath.clone(), reason: format!("not a valid manifest: {e}") })?;
    if manifest.schema != MANIFEST_SCHEMA {
        return Err(Error::BadBundle { path: mpath, reason: format!("unknown manifest schema {:?}", manifest.schema) });
    }
    let actual = hash_dir(dir)?;
    let mut problems = Vec::new();
    for (file, want) in &manifest.files {
        match actual.get(file) {
            None => problems.push(Problem::Missing { file: file.clone() }),
            Some(got) if got != want => problems.push(Problem::Modified {
                file: file.clone(),
                expected: want.sha256.clone(),
                actual: got.sha256.clone(),
            }),
            Some(_) => {}
        }
    }
    for file in actual.keys() {
        if !manifest.files.contains_key(file) {
            problems.push(Problem::Unexpected { file: file.clone() });
        }
    }
    Ok((manifest, problems))
}
