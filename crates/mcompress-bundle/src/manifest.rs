//! `manifest.json`: what went in, what came out, and the hash of every bundle file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mcompress_core::{ModelSource, fsutil};
use mcompress_passes::Pass;
use mcompress_recipe::{Recipe, TargetSection};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Result, TOOL_VERSION, io};

/// Schema id of manifests written by this version.
pub const MANIFEST_SCHEMA: &str = "mcompress.manifest/v1";

/// Hash and size of one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FileEntry {
    /// Lowercase hex sha256.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// The manifest of a bundle.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Manifest {
    /// [`MANIFEST_SCHEMA`].
    pub schema: String,
    /// `{name, version}` of the tool.
    pub tool: BTreeMap<String, String>,
    /// Recipe file name and sha256.
    pub recipe: FileNamed,
    /// Input files (paths relative to the model) with hashes.
    pub inputs: BTreeMap<String, FileEntry>,
    /// Passes in order with resolved settings.
    pub passes: Vec<PassEntry>,
    /// Target name and size limit.
    pub target: Value,
    /// `passed` or `failed` (a gate failed; the bundle is written but must not be deployed).
    pub status: String,
    /// Every file of the bundle except this manifest, with hashes.
    pub files: BTreeMap<String, FileEntry>,
}

/// A named file with its hash.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FileNamed {
    /// File name.
    pub file: String,
    /// Lowercase hex sha256.
    pub sha256: String,
}

/// A pass and its settings.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PassEntry {
    /// Pass type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Resolved settings.
    pub settings: Value,
}

impl Manifest {
    /// The manifest of one target's bundle: recipe, input hashes, passes with settings, target,
    /// every file's hash, and whether every gate passed.
    pub fn new(
        recipe: &Recipe,
        inputs: &BTreeMap<String, FileEntry>,
        passes: &[Box<dyn Pass>],
        target: &TargetSection,
        files: BTreeMap<String, FileEntry>,
        passed: bool,
    ) -> Self {
        Manifest {
            schema: MANIFEST_SCHEMA.into(),
            tool: BTreeMap::from([("name".into(), "mcompress".into()), ("version".into(), TOOL_VERSION.into())]),
            recipe: recipe_named(recipe),
            inputs: inputs.clone(),
            passes: passes.iter().map(|p| PassEntry { kind: p.name().into(), settings: p.settings() }).collect(),
            target: serde_json::json!({"name": target.name, "profile": target.profile, "max_size": target.max_size}),
            status: if passed { "passed" } else { "failed" }.into(),
            files,
        }
    }
}

/// The recipe file's name and sha256 of its text.
pub fn recipe_named(recipe: &Recipe) -> FileNamed {
    FileNamed {
        file: recipe.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        sha256: fsutil::sha256_bytes(recipe.source.as_bytes()),
    }
}

/// Hashes the model's input files; keys are paths relative to the model directory.
pub fn hash_inputs(model: &ModelSource, files: &[PathBuf]) -> Result<BTreeMap<String, FileEntry>> {
    let base = if model.path().is_dir() { model.path() } else { model.path().parent().unwrap_or(Path::new("")) };
    files
        .iter()
        .map(|f| {
            let key = f.strip_prefix(base).unwrap_or(f).to_string_lossy().into_owned();
            let bytes = fs_err::metadata(f).map_err(io(f))?.len();
            Ok((key, FileEntry { sha256: fsutil::sha256_file_cached(f)?, bytes }))
        })
        .collect()
}

/// Hashes every regular file under `dir` except `manifest.json` and `manifest.sig`; keys are
/// `/`-separated relative paths. Anything that is not a regular file or directory is an error.
pub fn hash_dir(dir: &Path) -> Result<BTreeMap<String, FileEntry>> {
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out, None)?;
    Ok(out)
}

/// [`hash_dir`] for verification: entries that are not regular files or directories (links,
/// FIFOs, devices) are returned by relative path instead of failing the walk (and never opened).
pub fn hash_dir_checked(dir: &Path) -> Result<(BTreeMap<String, FileEntry>, Vec<String>)> {
    let mut out = BTreeMap::new();
    let mut odd = Vec::new();
    walk(dir, dir, &mut out, Some(&mut odd))?;
    Ok((out, odd))
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<String, FileEntry>,
    mut odd: Option<&mut Vec<String>>,
) -> Result<()> {
    for e in fs_err::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let path = e.path();
        let ft = e.file_type().map_err(io(&path))?;
        let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().replace('\\', "/");
        if ft.is_dir() {
            walk(root, &path, out, odd.as_deref_mut())?;
        } else if ft.is_file() {
            if rel == "manifest.json" || rel == "manifest.sig" {
                continue;
            }
            let bytes = e.metadata().map_err(io(&path))?.len();
            out.insert(rel, FileEntry { sha256: fsutil::sha256_file(&path)?, bytes });
        } else if let Some(odd) = odd.as_deref_mut() {
            odd.push(rel);
        } else {
            return Err(crate::Error::BadBundle {
                path,
                reason: "not a regular file (links are not allowed in bundles)".into(),
            });
        }
    }
    Ok(())
}
