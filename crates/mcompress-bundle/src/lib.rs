//! Bundles: the files a run writes, and the tools that read them back.
//!
//! # Overview
//! One bundle per target: `<out>/<target>/` with `model.safetensors`, `config.json` (with
//! `quantization_config`), the tokenizer files, and/or `model.gguf`; `report.json`, `report.md`,
//! `report.html` and `manifest.json` (written last). This crate writes those pieces
//! ([`write_payload`], the GGUF export in [`ship`], [`report`], [`manifest`], [`sign`]), stages
//! and replaces bundle directories ([`replace_dir`], [`clean_stale`]), and reads bundles back
//! ([`verify`], [`inspect`], [`dequantize`], [`compare`], [`conformance`]). It runs no model:
//! the orchestrator that calibrates, trains and evaluates (`mcompress_run`) sits above it, so
//! this crate builds without burn (the training runtime).
//!
//! # Example
//! ```no_run
//! let (manifest, problems) = mcompress_bundle::verify("out/cpu".as_ref())?;
//! assert!(problems.is_empty(), "{problems:?}");
//! # Ok::<(), mcompress_bundle::Error>(())
//! ```
#![deny(missing_docs)]

pub mod compare;
pub mod conformance;
mod dequantize;
mod fit;
mod gguf;
mod html;
mod inspect;
pub mod manifest;
pub mod report;
pub mod ship;
pub mod sign;
pub mod targets;
mod verify;

use std::path::{Path, PathBuf};

use mcompress_core::{ModelSource, fsutil};
use mcompress_passes::pipeline;
use mcompress_recipe::Recipe;
use serde_json::Value;

pub use dequantize::dequantize;
pub use inspect::{InspectedTensor, Inspection, inspect};
pub use manifest::{FileEntry, MANIFEST_SCHEMA, Manifest};
pub use report::{Gate, REPORT_SCHEMA, Report, TargetReport};
pub use sign::{SIGNATURE_FILE, check_signature, keygen, load_signing_key, load_verifying_key};
pub use verify::{Problem, verify};

/// JSON schema of `report.json` (checked in as docs/report.schema.json).
pub fn report_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Report)).expect("schema is JSON")
}

/// JSON schema of `manifest.json` (checked in as docs/manifest.schema.json).
pub fn manifest_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Manifest)).expect("schema is JSON")
}

/// Tool version written into manifests and reports.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Errors from building, verifying or inspecting bundles.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Recipe problem.
    #[error(transparent)]
    Recipe(#[from] mcompress_recipe::Error),
    /// Pass problem.
    #[error(transparent)]
    Pass(#[from] mcompress_passes::Error),
    /// Tensor I/O problem.
    #[error(transparent)]
    Core(#[from] mcompress_core::Error),
    /// File system problem.
    #[error("{}: {source}", path.display())]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The output location would destroy or overlap the input.
    #[error("output {}: {reason}", path.display())]
    UnsafeOutput {
        /// Bundle directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The eval failed (bad eval set, weights that do not fit the architecture).
    #[error("[eval] {0}")]
    Eval(String),
    /// A calibrated pass's calibration failed (message names the pass).
    #[error("{0}")]
    Calibration(String),
    /// A pass could not read what it needs from the model (message names the pass).
    #[error("{0}")]
    Prepare(String),
    /// A GGUF export problem (message names the target and tensor).
    #[error("{0}")]
    Export(String),
    /// A bundle or manifest is malformed.
    #[error("{}: {reason}", path.display())]
    BadBundle {
        /// Path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads a report, manifest or modules.json: a regular file of at most
/// [`fsutil::MAX_JSON_BYTES`] (they are a few KiB to a few MiB for real bundles; a larger one is
/// refused instead of read into memory).
pub(crate) fn read_json_file(path: &Path) -> std::io::Result<Vec<u8>> {
    fsutil::read_regular(path, fsutil::MAX_JSON_BYTES)
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Checks every target's formats and GGUF settings (what `run` checks before it starts).
pub fn check_targets(recipe: &Recipe) -> Result<()> {
    for (i, t) in recipe.targets.iter().enumerate() {
        ship::Shipping::of(recipe, i, t)?;
    }
    Ok(())
}

/// The report's `eval` object, the `max-drop` gate and warnings.
pub type EvalOutcome = (Option<Value>, Option<Gate>, Vec<String>);

/// config.json (with `quantization_config`) and auxiliary files beside the weights.
pub fn write_payload(
    model: &ModelSource,
    passes: &[Box<dyn mcompress_passes::Pass>],
    output: &pipeline::Output,
    dir: &Path,
) -> Result<()> {
    let qc = pipeline::quantization_config(&output.params);
    let mut config = pipeline::output_config(model, passes);
    // The dtype the weights now have (a cast changes it; quantized scales count as theirs), so
    // transformers loads the bundle in it instead of the source's.
    if let (Some(d), Some(obj)) = (torch_dtype(&output.params), config.as_mut().and_then(Value::as_object_mut)) {
        obj.insert("torch_dtype".into(), d.into());
        if obj.contains_key("dtype") {
            obj.insert("dtype".into(), d.into());
        }
    }
    if let Some(qc) = qc {
        let c = config.get_or_insert_with(|| Value::Object(serde_json::Map::new()));
        if let Some(obj) = c.as_object_mut() {
            obj.insert("quantization_config".into(), qc);
        }
    }
    if let Some(c) = config {
        let mut text = serde_json::to_vec_pretty(&c).expect("config is JSON");
        text.push(b'\n');
        fsutil::write_atomic(&dir.join("config.json"), &text)?;
    }
    for (name, bytes) in model.generated_files() {
        fsutil::write_atomic(&dir.join(name), bytes)?;
    }
    // Aux files keep their place relative to the model directory (`1_Pooling/config.json`).
    let base = if model.path().is_dir() { model.path().to_path_buf() } else { PathBuf::new() };
    for f in model.aux_files() {
        let rel = f.strip_prefix(&base).ok().filter(|r| r.components().count() <= 2);
        let rel = rel.map_or_else(|| PathBuf::from(f.file_name().expect("aux files have names")), Path::to_path_buf);
        let dest = dir.join(&rel);
        if let Some(parent) = dest.parent() {
            fs_err::create_dir_all(parent).map_err(io(parent))?;
        }
        fs_err::copy(f, &dest).map_err(io(f))?;
    }
    Ok(())
}

/// transformers' name of the dtype to load the bundle in: the float dtype holding most of the
/// dense parameters (a `cast` pass sets it), else that of the quantized matrices' scales.
fn torch_dtype(params: &std::collections::BTreeMap<String, mcompress_passes::ParamMeta>) -> Option<&'static str> {
    let name = |d: mcompress_core::DType| match d {
        mcompress_core::DType::F32 => Some("float32"),
        mcompress_core::DType::F16 => Some("float16"),
        mcompress_core::DType::BF16 => Some("bfloat16"),
        _ => None,
    };
    let mut dense: std::collections::BTreeMap<&'static str, u64> = std::collections::BTreeMap::new();
    let mut scales = dense.clone();
    for m in params.values() {
        let (d, into) = match m {
            mcompress_passes::ParamMeta::Quantized { scale_dtype, .. } => (*scale_dtype, &mut scales),
            other => match other.float_dtype() {
                Some(d) => (d, &mut dense),
                None => continue,
            },
        };
        if let Some(n) = name(d) {
            *into.entry(n).or_default() += m.shape().iter().product::<usize>() as u64;
        }
    }
    let top = |c: std::collections::BTreeMap<&'static str, u64>| c.into_iter().max_by_key(|&(_, n)| n).map(|(d, _)| d);
    top(dense).or_else(|| top(scales))
}

/// Copies the deployable files of one staged bundle into another.
pub fn copy_payload(from: &Path, to: &Path) -> Result<()> {
    // The stage may already hold this target's model.gguf (written while the weights
    // streamed): only the payload's own files are replaced.
    fs_err::create_dir_all(to).map_err(io(to))?;
    for e in fs_err::read_dir(from).map_err(io(from))? {
        let e = e.map_err(io(from))?;
        let name = e.file_name();
        if matches!(name.to_str(), Some("report.json" | "report.md" | "report.html" | "manifest.json" | "manifest.sig"))
        {
            continue;
        }
        let dest = to.join(&name);
        if e.file_type().map_err(io(&e.path()))?.is_dir() {
            // A sentence-transformers module directory (1_Pooling/).
            copy_payload(&e.path(), &dest)?;
            continue;
        }
        if dest.exists() {
            fs_err::remove_file(&dest).map_err(io(&dest))?;
        }
        // Weights are immutable once written: a hard link saves the copy; copy where links fail.
        if fs_err::hard_link(e.path(), &dest).is_err() {
            fs_err::copy(e.path(), &dest).map_err(io(&e.path()))?;
        }
    }
    Ok(())
}

/// Checks where a run of `recipe` would write, before any work (`run` and `recipe check` both
/// call it): the output directory (`out`, else `[output] dir`) is a directory or absent, and no
/// target's bundle directory is, contains or sits inside the model's files.
pub fn check_output(recipe: &Recipe, out: Option<&Path>, model: &ModelSource) -> Result<()> {
    let out_dir = out.map_or_else(|| recipe.output_dir.clone(), Path::to_path_buf);
    if let Ok(m) = std::fs::metadata(&out_dir)
        && !m.is_dir()
    {
        return Err(Error::UnsafeOutput { path: out_dir, reason: "exists and is not a directory".into() });
    }
    let abs = absolute_through_existing(&out_dir)?;
    for t in &recipe.targets {
        let b = abs.join(&t.name);
        if let Ok(m) = std::fs::symlink_metadata(&b)
            && !m.is_dir()
        {
            return Err(Error::UnsafeOutput {
                path: b,
                reason: "exists and is not a directory (a bundle directory replaces only a bundle)".into(),
            });
        }
        check_output_safe(&b, model)?;
    }
    Ok(())
}

/// `p` made absolute with its existing part canonicalized (links resolved), the rest appended.
fn absolute_through_existing(p: &Path) -> Result<PathBuf> {
    let p = std::path::absolute(p).map_err(io(p))?;
    let mut existing = p.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => break,
        }
    }
    let mut out = fs_err::canonicalize(existing).map_err(io(existing))?;
    for name in rest.iter().rev() {
        out.push(name);
    }
    Ok(out)
}

/// Refuses a bundle directory that is, contains, or sits inside the model's files.
pub fn check_output_safe(bundle: &Path, model: &ModelSource) -> Result<()> {
    let model_path = fs_err::canonicalize(model.path()).map_err(io(model.path()))?;
    let model_dir = if model_path.is_dir() {
        model_path.clone()
    } else {
        model_path.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    for f in model.input_files() {
        let f = fs_err::canonicalize(&f).map_err(io(&f))?;
        if f.starts_with(bundle) {
            return Err(Error::UnsafeOutput {
                path: bundle.to_path_buf(),
                reason: format!("would overwrite input file {} (choose an output dir outside the model)", f.display()),
            });
        }
    }
    if model_dir.starts_with(bundle) {
        return Err(Error::UnsafeOutput {
            path: bundle.to_path_buf(),
            reason: format!("would replace the directory holding the model {}", model_dir.display()),
        });
    }
    Ok(())
}

/// Removes temp dirs left by runs that are no longer alive.
pub fn clean_stale(out_dir: &Path) {
    let Ok(rd) = fs_err::read_dir(out_dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .rsplit_once(".mcompress-tmp-")
            .or_else(|| name.rsplit_once(".mcompress-old-"))
            .map(|(_, p)| p.to_string())
        else {
            continue;
        };
        // `PID` or `PID-ATTEMPT`; a name of another shape is not ours and is left alone.
        let Ok(pid) = pid.split('-').next().unwrap_or_default().parse::<u32>() else { continue };
        let alive = pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            let _ = fs_err::remove_dir_all(e.path());
        }
    }
}

/// Moves `staged` to `dest`, replacing a previous bundle there.
pub fn replace_dir(staged: &Path, dest: &Path) -> Result<()> {
    // Another run may be moving its bundle to the same place at the same moment: whichever rename
    // lands last wins, and neither fails. A previous bundle is moved aside (never deleted before
    // the new one is in place) and removed after.
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut aside = Vec::new();
    let mut result = Ok(());
    for attempt in 0..32 {
        match fs_err::rename(staged, dest) {
            Ok(()) => {
                result = Ok(());
                break;
            }
            Err(e) if dest.exists() && attempt < 31 => {
                let old = dest.with_file_name(format!(".{name}.mcompress-old-{}-{attempt}", std::process::id()));
                match fs_err::rename(dest, &old) {
                    Ok(()) => aside.push(old),
                    Err(e2) if e2.kind() == std::io::ErrorKind::NotFound => {}
                    Err(_) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    for old in &aside {
        let _ = fs_err::remove_dir_all(old);
    }
    result.map_err(io(dest))
}
