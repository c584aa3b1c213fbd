//! `recipe.toml`: schema, two-stage parsing and validation.
//!
//! # Overview
//! Stage one deserializes the document into [`RawRecipe`] with `deny_unknown_fields` everywhere,
//! keeping each `[[pass]]` as a table. Stage two, driven by the pass registry, deserializes each
//! pass table into that pass's own config type through [`Recipe::pass_config`]. Both stages keep
//! source spans, so every error reads `recipe.toml:LINE:COL: pass[1] quantize-rtn: unknown field
//! `bitz`, expected one of ...`.
//!
//! # Example
//! ```
//! let src = "[model]\npath = \"m.safetensors\"\n[[pass]]\ntype = \"cast\"\ndtype = \"f16\"\n";
//! let recipe = mcompress_recipe::Recipe::parse("r.toml".as_ref(), src.into()).unwrap();
//! assert_eq!(recipe.passes[0].kind, "cast");
//! ```
#![deny(missing_docs)]

mod expand;
mod size;

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;
use serde::de::DeserializeOwned;

pub use size::ByteSize;

/// Errors from reading and validating a recipe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The recipe file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// Recipe path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A syntax or schema error at a position of the recipe.
    #[error("{}:{line}:{col}: {context}{message}", path.display())]
    At {
        /// Recipe path.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// `pass[1] quantize-rtn: ` or empty.
        context: String,
        /// What is wrong.
        message: String,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The recipe file as written (stage one). `mcompress recipe schema` prints its JSON schema,
/// with each pass's own config schema filled in.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawRecipe {
    /// The model to compress.
    pub model: ModelSection,
    /// Passes, run in order. Each table has a `type` (see `mcompress passes`) and that pass's settings.
    #[serde(default)]
    #[schemars(with = "Vec<serde_json::Map<String, serde_json::Value>>")]
    pub pass: Vec<toml::Table>,
    /// Accuracy check of the compressed model against the original.
    pub eval: Option<EvalSection>,
    /// Where bundles go.
    #[serde(default)]
    pub output: OutputSection,
    /// Deployment targets; one bundle each. None given: one target named `default`.
    #[serde(default)]
    pub target: Vec<TargetSection>,
}

/// `[model]`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ModelSection {
    /// Model directory (config.json, model.safetensors or a sharded index, tokenizer files) or a
    /// `.safetensors` file. Relative paths are relative to the recipe file.
    pub path: PathBuf,
}

/// Metric computed by the eval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, JsonSchema, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// Top-1 accuracy on a labelled classification set (higher is better).
    Accuracy,
    /// Perplexity on plain text (lower is better).
    Perplexity,
    /// Mean KL divergence of next-token distributions vs the reference (lower is better).
    Kl,
    /// Mean cosine similarity of embeddings vs the reference (higher is better).
    Cosine,
    /// Spearman correlation on a word/sentence similarity set (higher is better).
    Spearman,
}

/// Compute backend for the eval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, JsonSchema, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// A hardware GPU through wgpu when one exists, else the CPU.
    #[default]
    Auto,
    /// wgpu (GPU kernels; Mesa llvmpipe where no GPU exists).
    Wgpu,
    /// CPU.
    Cpu,
}

/// `[eval]`: validated here, executed by the eval runtime.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EvalSection {
    /// Eval set file, relative to the recipe file.
    pub set: PathBuf,
    /// Metric.
    pub metric: Metric,
    /// Backend.
    #[serde(default)]
    pub backend: Backend,
    /// Gate: largest allowed drop, relative (`"0.5%"`) or absolute (`0.01`). Direction is known
    /// per metric. Exceeded: exit 1 and FAIL in the report.
    pub max_drop: Option<MaxDrop>,
    /// Perplexity/KL: tokens per window.
    pub window: Option<u32>,
    /// Perplexity/KL: use only the first N tokens of the set.
    pub max_tokens: Option<u32>,
    /// Samples per batch.
    pub batch_size: Option<u32>,
}

/// A gate threshold: `"0.5%"` (relative) or a number (absolute, in the metric's units).
#[derive(Clone, Copy, Debug, PartialEq, JsonSchema, serde::Serialize)]
#[serde(untagged)]
pub enum MaxDrop {
    /// Relative to the reference value, in percent.
    #[schemars(with = "String")]
    Percent(f64),
    /// Absolute, in the metric's units.
    Absolute(f64),
}

impl<'de> Deserialize<'de> for MaxDrop {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            F(f64),
            I(i64),
        }
        let bad = |s: &str| {
            serde::de::Error::custom(format!(
                "max-drop {s:?}: expected a percentage like \"0.5%\" or a non-negative number"
            ))
        };
        match Raw::deserialize(d)? {
            Raw::S(s) => {
                let v: f64 = s.trim().strip_suffix('%').and_then(|p| p.trim().parse().ok()).ok_or_else(|| bad(&s))?;
                if v.is_finite() && v >= 0.0 { Ok(MaxDrop::Percent(v)) } else { Err(bad(&s)) }
            }
            Raw::F(v) if v.is_finite() && v >= 0.0 => Ok(MaxDrop::Absolute(v)),
            Raw::I(v) if v >= 0 => Ok(MaxDrop::Absolute(v as f64)),
            Raw::F(v) => Err(bad(&v.to_string())),
            Raw::I(v) => Err(bad(&v.to_string())),
        }
    }
}

/// `[output]`.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OutputSection {
    /// Directory that receives one bundle per target (`DIR/<target name>`). Relative paths are
    /// relative to the working directory. Default: `dist/<recipe file stem>`.
    pub dir: Option<PathBuf>,
}

/// `[[target]]`: where a bundle is meant to run. Name a catalog `profile` (`mcompress targets`)
/// and override any of its fields, or describe the hardware inline.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TargetSection {
    /// Bundle directory name: letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// Catalog id, e.g. `"l4-24gb"` or `"jetson-orin-nano-8gb"`.
    pub profile: Option<String>,
    /// Largest allowed bundle size (`"10MiB"`, `"1.5GB"`, bytes) or `"auto"`: what fits in the
    /// target's memory beside runtime overhead and the KV cache. Exceeded: exit 1.
    pub max_size: Option<MaxSize>,
    /// Tokens of context the KV cache must hold (decoders; default 2048).
    pub context: Option<u32>,
    /// Concurrent sequences (default 1).
    pub batch: Option<u32>,
    /// Memory available to the model (overrides the profile).
    pub memory: Option<ByteSize>,
    /// Peak memory bandwidth in GB/s (overrides the profile).
    pub bandwidth_gbs: Option<f64>,
    /// Peak dense TFLOP/s per dtype (`{ f16 = 121.0 }`), merged over the profile's.
    pub tflops: Option<std::collections::BTreeMap<String, f64>>,
    /// Memory kept for the runtime and activations (overrides the profile).
    pub overhead: Option<ByteSize>,
    /// Weight dtypes the target's runtimes execute (`f32`, `f16`, `bf16`, `int8`, `int4`, ...).
    pub weight_dtypes: Option<Vec<String>>,
    /// Weight files the bundle ships: `safetensors` (the packed layout, default) and/or `gguf`
    /// (a llama.cpp file; decoder models: llama, mistral, qwen2, gemma3_text, phi3, mixtral,
    /// qwen3_moe). Also what the target's runtimes load, for the fit check.
    pub formats: Option<Vec<String>>,
    /// GGUF tensor types (with `formats = ["gguf"]`): a ggml type (`Q8_0`, `Q4_0`, `Q4_1`, `Q5_0`,
    /// `Q5_1`, `Q4_K`, `Q5_K`, `Q6_K`, `F16`, `F32`) or a llama.cpp mix (`Q4_K_M`, `Q4_K_S`,
    /// `Q5_K_M`, `Q5_K_S`). Default `Q8_0`. See docs/gguf.md.
    pub gguf_type: Option<String>,
    /// `"fixed"` (default: `gguf-type` as llama-quantize applies it) or `"fit"`: choose a GGUF
    /// type per tensor that minimises the summed, activation-weighted quantization error within
    /// `max-size`; on an eval-gate failure raise the most sensitive tensors and retry.
    pub policy: Option<Policy>,
    /// `policy = "fit"`: the ggml types to choose from (default: every quantized type and F16).
    pub fit_types: Option<Vec<String>>,
    /// `policy = "fit"`: tries in all when the eval gate fails (default 3, at most 10).
    pub fit_tries: Option<u32>,
    /// `policy = "fit"`: text whose activations weight each tensor's error (decoder models);
    /// without it every input channel weighs the same.
    pub calibration: Option<TargetCalibration>,
    /// Managed on-demand price, $/hour.
    pub price_per_hour: Option<f64>,
    /// Self-hosted amortised cost, $/hour.
    pub self_hosted_per_hour: Option<f64>,
}

/// `policy` of a target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The types `gguf-type` names.
    #[default]
    Fixed,
    /// Per-tensor types chosen to fit `max-size`.
    Fit,
}

/// `calibration = { set, samples, seq-len, seed }` of a target with `policy = "fit"`.
#[derive(Clone, Debug, Deserialize, serde::Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TargetCalibration {
    /// Plain UTF-8 text, relative to the recipe (`${VAR}` expanded).
    pub set: PathBuf,
    /// Token windows drawn from the text (default 32).
    pub samples: Option<usize>,
    /// Tokens per window (default 512).
    pub seq_len: Option<usize>,
    /// Seed of the window choice (default 0).
    pub seed: Option<u64>,
}

/// `max-size`: a fixed size or `"auto"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(untagged)]
pub enum MaxSize {
    /// Derived from the target's memory.
    #[schemars(with = "String")]
    Auto,
    /// A fixed number of bytes.
    Bytes(ByteSize),
}

impl serde::Serialize for MaxSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MaxSize::Auto => s.serialize_str("auto"),
            MaxSize::Bytes(b) => s.serialize_u64(b.0),
        }
    }
}

impl<'de> Deserialize<'de> for MaxSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            I(u64),
        }
        match Raw::deserialize(d)? {
            Raw::S(s) if s == "auto" => Ok(MaxSize::Auto),
            Raw::S(s) => ByteSize::parse(&s).map(MaxSize::Bytes).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "max-size {s:?}: expected \"auto\", a size like \"10MiB\" or \"1.5GB\", or a number of bytes"
                ))
            }),
            Raw::I(v) => Ok(MaxSize::Bytes(ByteSize(v))),
        }
    }
}

/// One `[[pass]]` entry after stage one.
#[derive(Clone, Debug)]
pub struct PassSpec {
    /// Position in the recipe (0-based, as in `pass[1]`).
    pub index: usize,
    /// The `type` key.
    pub kind: String,
    /// 1-based line of the pass table.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
}

/// A parsed, stage-one-validated recipe.
#[derive(Debug)]
pub struct Recipe {
    /// Recipe file.
    pub path: PathBuf,
    /// Its text.
    pub source: String,
    /// Model path, resolved against the recipe's directory.
    pub model_path: PathBuf,
    /// Passes.
    pub passes: Vec<PassSpec>,
    /// Eval section with `set` resolved against the recipe's directory.
    pub eval: Option<EvalSection>,
    /// Output directory (not yet resolved against the working directory).
    pub output_dir: PathBuf,
    /// Targets (at least one).
    pub targets: Vec<TargetSection>,
    /// 1-based (line, column) of each `[[target]]` table, for errors.
    pub target_positions: Vec<(usize, usize)>,
}

/// Largest recipe file read (a recipe is a few KiB).
pub const MAX_RECIPE_BYTES: u64 = 16 << 20;

/// A recipe's text: a regular UTF-8 file of at most [`MAX_RECIPE_BYTES`] (a FIFO or device is
/// refused before it is opened, so it cannot block).
fn read_recipe(path: &Path) -> std::io::Result<String> {
    use std::io::{Error as E, ErrorKind, Read};
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(E::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut text = String::new();
    std::fs::File::open(path)?.take(MAX_RECIPE_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_RECIPE_BYTES {
        return Err(E::new(ErrorKind::InvalidData, format!("larger than {MAX_RECIPE_BYTES} bytes")));
    }
    Ok(text)
}

impl Recipe {
    /// Reads and parses a recipe file.
    pub fn load(path: &Path) -> Result<Self> {
        let source = read_recipe(path).map_err(|source| Error::Io { path: path.into(), source })?;
        Self::parse(path, source)
    }

    /// Parses recipe text; `path` locates relative paths and names the file in errors.
    pub fn parse(path: &Path, source: String) -> Result<Self> {
        let at = |span: Option<std::ops::Range<usize>>, context: String, message: String| {
            let offset = span.map_or(0, |s| s.start);
            let (line, col) = line_col(&source, offset);
            Error::At { path: path.into(), line, col, context, message: with_key(&source, offset, true, message) }
        };
        let raw: RawRecipe =
            toml::from_str(&source).map_err(|e| at(e.span(), String::new(), e.message().trim().to_string()))?;
        for (what, n, max) in [("passes", raw.pass.len(), MAX_PASSES), ("targets", raw.target.len(), MAX_TARGETS)] {
            if n > max {
                return Err(at(None, String::new(), format!("{n} {what}: at most {max} are allowed")));
            }
        }
        let spans = pass_spans(&source);
        let mut passes = Vec::with_capacity(raw.pass.len());
        for (index, table) in raw.pass.iter().enumerate() {
            let span = spans.get(index).cloned();
            let kind = match table.get("type") {
                Some(toml::Value::String(s)) => s.clone(),
                Some(other) => {
                    return Err(at(
                        span,
                        format!("pass[{index}]: "),
                        format!("`type` must be a string, found {}", other.type_str()),
                    ));
                }
                None => {
                    return Err(at(span, format!("pass[{index}]: "), "missing `type` (see `mcompress passes`)".into()));
                }
            };
            let (line, col) = line_col(&source, span.map_or(0, |s| s.start));
            passes.push(PassSpec { index, kind, line, col });
        }
        let dir = path.parent().unwrap_or(Path::new(""));
        let mut targets = raw.target;
        if targets.is_empty() {
            targets.push(TargetSection { name: "default".into(), ..TargetSection::default() });
        }
        let target_spans = array_spans(&source, "target");
        for (i, t) in targets.iter().enumerate() {
            if !valid_target_name(&t.name) {
                return Err(at(
                    target_spans.get(i).cloned(),
                    format!("target[{i}]: "),
                    format!("name {:?} must be 1-64 letters, digits, '.', '_' or '-', and not '.' or '..'", t.name),
                ));
            }
            if targets[..i].iter().any(|o| o.name == t.name) {
                return Err(at(
                    target_spans.get(i).cloned(),
                    format!("target[{i}]: "),
                    format!("duplicate target name {:?}", t.name),
                ));
            }
        }
        let env = |name: &str| std::env::var(name).ok();
        let expand_path = |p: &Path, field: &str| -> Result<PathBuf> {
            let s = p.to_string_lossy();
            let span = key_span(&source, field);
            expand::expand(&s, &env).map(PathBuf::from).map_err(|m| at(span, String::new(), format!("{field}: {m}")))
        };
        let model_path = dir.join(expand_path(&raw.model.path, "model.path")?);
        for (i, t) in targets.iter_mut().enumerate() {
            if let Some(c) = &mut t.calibration {
                let s = c.set.to_string_lossy().into_owned();
                let e = expand::expand(&s, &env).map_err(|m| {
                    at(target_spans.get(i).cloned(), format!("target[{i}]: "), format!("calibration.set: {m}"))
                })?;
                c.set = dir.join(e);
            }
        }
        if let Some(e) = &raw.eval
            && e.metric == Metric::Kl
            && matches!(e.max_drop, Some(MaxDrop::Percent(_)))
        {
            return Err(at(
                key_span(&source, "eval.max-drop"),
                String::new(),
                "eval.max-drop: kl is 0 for the reference, so a percentage cannot bound it; give an absolute limit (e.g. 0.05)".into(),
            ));
        }
        let eval = match raw.eval {
            Some(mut e) => {
                e.set = dir.join(expand_path(&e.set, "eval.set")?);
                Some(e)
            }
            None => None,
        };
        let output_dir = raw.output.dir.as_deref().map(|d| expand_path(d, "output.dir")).transpose()?;
        let stem = path.file_stem().map_or_else(|| "recipe".into(), |s| s.to_string_lossy().into_owned());
        let output_dir = output_dir.unwrap_or_else(|| Path::new("dist").join(stem));
        let target_positions =
            (0..targets.len()).map(|i| line_col(&source, target_spans.get(i).map_or(0, |s| s.start))).collect();
        Ok(Recipe { model_path, path: path.into(), source, passes, eval, output_dir, targets, target_positions })
    }

    /// Stage two: deserializes pass `index` (without its `type` key) into `T`. Errors carry the
    /// position of the offending key or value and read `pass[1] quantize-rtn: ...`.
    pub fn pass_config<T: DeserializeOwned>(&self, index: usize) -> Result<T> {
        let spec = &self.passes[index];
        let context = format!("pass[{index}] {}: ", spec.kind);
        let err = |span: Option<std::ops::Range<usize>>, message: String| {
            let (line, col) = span.clone().map_or((spec.line, spec.col), |s| line_col(&self.source, s.start));
            let message = match span {
                Some(s) => with_key(&self.source, s.start, false, message),
                None => message,
            };
            Error::At { path: self.path.clone(), line, col, context: context.clone(), message }
        };
        let doc = toml::de::DeTable::parse(&self.source).map_err(|e| err(e.span(), e.message().into()))?;
        let item = doc
            .get_ref()
            .get("pass")
            .and_then(|p| match p.get_ref() {
                toml::de::DeValue::Array(a) => a.get(index).cloned(),
                _ => None,
            })
            .ok_or_else(|| err(None, "pass table not found".into()))?;
        let span = item.span();
        let toml::de::DeValue::Table(mut table) = item.into_inner() else {
            return Err(err(None, "pass must be a table".into()));
        };
        table.remove("type");
        let value = toml::Spanned::new(span, toml::de::DeValue::Table(table));
        T::deserialize(toml::de::ValueDeserializer::from(value))
            .map_err(|e| err(e.span(), e.message().trim().to_string()))
    }

    /// Builds an error at target `index`'s position, for checks done after parsing.
    pub fn target_error(&self, index: usize, message: impl Into<String>) -> Error {
        let (line, col) = self.target_positions.get(index).copied().unwrap_or((1, 1));
        Error::At {
            path: self.path.clone(),
            line,
            col,
            context: format!("target[{index}] {}: ", self.targets[index].name),
            message: message.into(),
        }
    }

    /// Keeps only the target named `name` (`run --target`), or explains which names exist.
    pub fn select_target(&mut self, name: &str) -> Result<()> {
        let Some(i) = self.targets.iter().position(|t| t.name == name) else {
            let names: Vec<&str> = self.targets.iter().map(|t| t.name.as_str()).collect();
            return Err(Error::At {
                path: self.path.clone(),
                line: 1,
                col: 1,
                context: String::new(),
                message: format!("--target {name:?}: no such target; the recipe defines {}", names.join(", ")),
            });
        };
        let t = self.targets.swap_remove(i);
        let p = self.target_positions.swap_remove(i);
        self.targets = vec![t];
        self.target_positions = vec![p];
        Ok(())
    }

    /// A path from a pass's config: `${VAR}` expanded, relative to the recipe's directory.
    pub fn pass_path(&self, index: usize, p: &Path, field: &str) -> Result<PathBuf> {
        let env = |name: &str| std::env::var(name).ok();
        let expanded =
            expand::expand(&p.to_string_lossy(), &env).map_err(|m| self.pass_error(index, format!("{field}: {m}")))?;
        Ok(self.path.parent().unwrap_or(Path::new("")).join(expanded))
    }

    /// Builds an error at pass `index`'s position, for checks done after deserialization.
    pub fn pass_error(&self, index: usize, message: impl Into<String>) -> Error {
        let spec = &self.passes[index];
        Error::At {
            path: self.path.clone(),
            line: spec.line,
            col: spec.col,
            context: format!("pass[{index}] {}: ", spec.kind),
            message: message.into(),
        }
    }
}

/// Span of `section.key` (e.g. `model.path`) in the document, for error positions.
fn key_span(source: &str, dotted: &str) -> Option<std::ops::Range<usize>> {
    let doc = toml::de::DeTable::parse(source).ok()?;
    let (section, key) = dotted.split_once('.')?;
    let toml::de::DeValue::Table(t) = doc.get_ref().get(section)?.get_ref() else {
        return None;
    };
    t.get(key).map(toml::Spanned::span)
}

fn valid_target_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n != "."
        && n != ".."
        && n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Spans of each `[[pass]]` table, in order.
fn pass_spans(source: &str) -> Vec<std::ops::Range<usize>> {
    array_spans(source, "pass")
}

fn array_spans(source: &str, key: &str) -> Vec<std::ops::Range<usize>> {
    let Ok(doc) = toml::de::DeTable::parse(source) else {
        return Vec::new();
    };
    match doc.get_ref().get(key).map(toml::Spanned::get_ref) {
        Some(toml::de::DeValue::Array(a)) => a.iter().map(toml::Spanned::span).collect(),
        _ => Vec::new(),
    }
}

/// Most `[[pass]]` entries a recipe may have (real recipes have a handful).
pub const MAX_PASSES: usize = 256;
/// Most `[[target]]` entries a recipe may have.
pub const MAX_TARGETS: usize = 256;

/// `message` prefixed with the key whose value sits at byte `offset` (`bits: …`, or with its
/// table, `eval.max-tokens: …`), when the line there is a `key = value` line and the message does
/// not name the key already.
fn with_key(source: &str, offset: usize, with_table: bool, message: String) -> String {
    let offset = offset.min(source.len());
    let start = source[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = source[start..].lines().next().unwrap_or_default();
    let Some((key, _)) = line.split_once('=') else { return message };
    let key = key.trim().trim_matches('"');
    if key.is_empty()
        || key.starts_with('[')
        || key.contains(char::is_whitespace)
        || message.contains(&format!("`{key}`"))
    {
        return message;
    }
    let table = source[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let prefix = match table {
        Some(t) if with_table && t != "pass" && t != "target" => format!("{t}.{key}: "),
        _ => format!("{key}: "),
    };
    if message.starts_with(&prefix) { message } else { format!("{prefix}{message}") }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// JSON schema of the recipe, with `pass` items as a `oneOf` over the given
/// `(type, summary, config schema)` triples.
pub fn json_schema(passes: &[(&str, &str, schemars::Schema)]) -> serde_json::Value {
    let mut root = serde_json::to_value(schemars::schema_for!(RawRecipe)).expect("schema is JSON");
    let mut one_of = Vec::new();
    for (name, summary, schema) in passes {
        let mut s = serde_json::to_value(schema).expect("schema is JSON");
        if let Some(obj) = s.as_object_mut() {
            if let Some(defs) = obj.remove("$defs") {
                let root_defs =
                    root.as_object_mut().expect("object").entry("$defs").or_insert_with(|| serde_json::json!({}));
                if let (Some(rd), Some(d)) = (root_defs.as_object_mut(), defs.as_object()) {
                    rd.extend(d.clone());
                }
            }
            obj.remove("$schema");
            obj.insert("description".into(), serde_json::Value::String((*summary).into()));
            let props = obj.entry("properties").or_insert_with(|| serde_json::json!({}));
            props["type"] = serde_json::json!({"const": name});
            let req = obj.entry("required").or_insert_with(|| serde_json::json!([]));
            if let Some(r) = req.as_array_mut() {
                r.insert(0, "type".into());
            }
        }
        one_of.push(s);
    }
    root["properties"]["pass"]["items"] = serde_json::json!({ "oneOf": one_of });
    root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Recipe> {
        Recipe::parse(Path::new("dir/r.toml"), src.into())
    }

    #[test]
    fn test_minimal_recipe_defaults() {
        let r = parse("[model]\npath = \"m\"\n").unwrap();
        assert_eq!(r.model_path, Path::new("dir/m"));
        assert_eq!(r.output_dir, Path::new("dist/r"));
        assert_eq!(r.targets[0].name, "default");
    }

    #[test]
    fn test_unknown_top_level_field_has_position() {
        let e = parse("[model]\npath = \"m\"\npth = 1\n").unwrap_err().to_string();
        assert!(e.starts_with("dir/r.toml:3:1: unknown field `pth`"), "{e}");
    }

    #[test]
    fn test_missing_model_path() {
        let e = parse("[model]\n").unwrap_err().to_string();
        assert!(e.contains("missing field `path`"), "{e}");
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct Cfg {
        bits: u8,
        #[serde(default)]
        group_size: u32,
    }

    #[test]
    fn test_pass_unknown_field_points_at_key() {
        let src = "[model]\npath = \"m\"\n[[pass]]\ntype = \"cast\"\n[[pass]]\ntype = \"q\"\nbits = 8\nbitz = 4\n";
        let r = parse(src).unwrap();
        let e = r.pass_config::<Cfg>(1).unwrap_err().to_string();
        assert!(e.starts_with("dir/r.toml:8:1: pass[1] q: unknown field `bitz`"), "{e}");
    }

    #[test]
    fn test_pass_wrong_type_points_at_value() {
        let src = "[model]\npath = \"m\"\n[[pass]]\ntype = \"q\"\nbits = \"eight\"\n";
        let e = parse(src).unwrap().pass_config::<Cfg>(0).unwrap_err().to_string();
        assert!(e.starts_with("dir/r.toml:5:8: pass[0] q: bits: invalid type: string"), "{e}");
        let ok: Cfg = parse("[model]\npath = \"m\"\n[[pass]]\ntype = \"q\"\nbits = 4\ngroup-size = 32\n")
            .unwrap()
            .pass_config(0)
            .unwrap();
        assert_eq!(ok.group_size, 32);
    }

    #[test]
    fn test_pass_without_type() {
        let e = parse("[model]\npath = \"m\"\n[[pass]]\nbits = 4\n").unwrap_err().to_string();
        assert!(e.contains("pass[0]: missing `type`"), "{e}");
    }

    #[test]
    fn test_target_names_cannot_escape() {
        for bad in ["..", "a/b", "", "x y"] {
            let src = format!("[model]\npath = \"m\"\n[[target]]\nname = {bad:?}\n");
            let e = parse(&src).unwrap_err().to_string();
            assert!(e.contains("target[0]"), "{e}");
        }
        let src = "[model]\npath = \"m\"\n[[target]]\nname = \"a\"\n[[target]]\nname = \"a\"\n";
        assert!(parse(src).unwrap_err().to_string().contains("duplicate target"));
    }

    #[test]
    fn test_eval_validation() {
        let src = "[model]\npath = \"m\"\n[eval]\nset = \"d.csv\"\nmetric = \"accuracy\"\nmax-drop = \"1%\"\n";
        let r = parse(src).unwrap();
        let e = r.eval.unwrap();
        assert_eq!(e.set, Path::new("dir/d.csv"));
        assert_eq!(e.max_drop, Some(MaxDrop::Percent(1.0)));
        let bad = "[model]\npath = \"m\"\n[eval]\nset = \"d\"\nmetric = \"acc\"\n";
        assert!(parse(bad).unwrap_err().to_string().contains("unknown variant `acc`"));
        let bad = "[model]\npath = \"m\"\n[eval]\nset = \"d\"\nmetric = \"kl\"\nmax-drop = \"lots\"\n";
        assert!(parse(bad).unwrap_err().to_string().contains("max-drop"));
    }

    #[test]
    fn test_max_size_parses() {
        let src = "[model]\npath = \"m\"\n[[target]]\nname = \"a\"\nmax-size = \"10MiB\"\n";
        assert_eq!(parse(src).unwrap().targets[0].max_size, Some(MaxSize::Bytes(ByteSize(10 << 20))));
        let src = "[model]\npath = \"m\"\n[[target]]\nname = \"a\"\nmax-size = \"auto\"\n";
        assert_eq!(parse(src).unwrap().targets[0].max_size, Some(MaxSize::Auto));
        let src = "[model]\npath = \"m\"\n[[target]]\nname = \"a\"\nmax-size = \"ten\"\n";
        assert!(parse(src).unwrap_err().to_string().contains("max-size"));
    }

    #[test]
    fn test_syntax_error_has_position() {
        let e = parse("[model\n").unwrap_err().to_string();
        assert!(e.starts_with("dir/r.toml:1:"), "{e}");
    }
}
