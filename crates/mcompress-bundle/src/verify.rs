//! `mcompress verify`: re-hash a bundle against its manifest.

use std::fmt;
use std::path::Path;

use crate::manifest::{Manifest, hash_dir_checked};
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
    /// `manifest.json` is not a readable manifest (edited, replaced by a link or a FIFO).
    Manifest {
        /// Why.
        reason: String,
    },
    /// The manifest records that a gate failed when the bundle was built: not deployable.
    Status {
        /// The recorded status.
        status: String,
    },
    /// A link, FIFO or device in the bundle (never followed or opened).
    NotRegular {
        /// File.
        file: String,
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
            Problem::Manifest { reason } => write!(f, "manifest.json: {reason}"),
            Problem::Status { status } => write!(
                f,
                "manifest.json: status {status:?}: a gate failed when the bundle was built (see report.md); it must not be deployed"
            ),
            Problem::NotRegular { file } => write!(f, "{file}: not a regular file (links are not allowed in bundles)"),
            Problem::Modified { file, expected, actual } => {
                write!(f, "{file}: sha256 {actual} does not match manifest {expected}")
            }
        }
    }
}

/// Reads `dir/manifest.json` and compares every file. `Ok((Some(manifest), vec![]))` means the
/// bundle is intact and passed its gates; a manifest that cannot be read as one (edited, a link,
/// not a regular file, too large) is a problem, not an error, and so is a recorded `failed`
/// status. Only a directory that is not a bundle at all (no `manifest.json`) is an error.
pub fn verify(dir: &Path) -> Result<(Option<Manifest>, Vec<Problem>)> {
    let mpath = dir.join("manifest.json");
    if !dir.is_dir() {
        return Err(Error::BadBundle { path: dir.into(), reason: "not a directory".into() });
    }
    let meta = std::fs::symlink_metadata(&mpath).map_err(io(&mpath))?;
    let (actual, odd) = hash_dir_checked(dir)?;
    let mut problems: Vec<Problem> = odd.into_iter().map(|file| Problem::NotRegular { file }).collect();
    let manifest = if meta.is_file() {
        match crate::read_json_file(&mpath) {
            Ok(text) => match serde_json::from_slice::<Manifest>(&text) {
                Ok(m) if m.schema == MANIFEST_SCHEMA => Some(m),
                Ok(m) => {
                    problems.push(Problem::Manifest { reason: format!("unknown manifest schema {:?}", m.schema) });
                    None
                }
                Err(e) => {
                    problems.push(Problem::Manifest { reason: format!("not a valid manifest: {e}") });
                    None
                }
            },
            Err(e) => {
                problems.push(Problem::Manifest { reason: e.to_string() });
                None
            }
        }
    } else {
        problems.retain(|p| !matches!(p, Problem::NotRegular { file } if file == "manifest.json"));
        problems.push(Problem::Manifest { reason: "not a regular file (a link or special file)".into() });
        None
    };
    let Some(manifest) = manifest else { return Ok((None, problems)) };
    if manifest.status != "passed" {
        problems.push(Problem::Status { status: manifest.status.clone() });
    }
    for (file, want) in &manifest.files {
        match actual.get(file) {
            None if problems.iter().any(|p| matches!(p, Problem::NotRegular { file: f } if f == file)) => {}
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
    Ok((Some(manifest), problems))
}
