//! Model sources: a Hugging Face style directory or a single `.safetensors` file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result, SafetensorsFile, TensorInfo, TensorView};

/// Non-weight files of a model directory that a bundle carries along unchanged
/// (tokenizers, generation and sentence-transformers settings).
pub const AUX_FILES: &[&str] = &[
    "added_tokens.json",
    "config_sentence_transformers.json",
    "generation_config.json",
    "merges.txt",
    "modules.json",
    "sentence_bert_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
];

/// Where one tensor lives: which shard and which entry of that shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorRef {
    shard: usize,
    idx: usize,
}

/// A model to read: config, weights (one file or shards) and auxiliary files.
#[derive(Debug)]
pub struct ModelSource {
    path: PathBuf,
    config_path: Option<PathBuf>,
    config: Option<serde_json::Value>,
    index_path: Option<PathBuf>,
    shards: Vec<SafetensorsFile>,
    tensors: Vec<TensorRef>,
    aux: Vec<PathBuf>,
}

#[derive(serde::Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

impl ModelSource {
    /// Opens a model directory (`config.json`, `model.safetensors` or
    /// `model.safetensors.index.json` with its shards, tokenizer files) or a `.safetensors` file.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = fs_err::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_dir() {
            let shard = SafetensorsFile::open(path)?;
            return Self::assemble(path, None, None, None, vec![shard], Vec::new());
        }
        let config_path = path.join("config.json");
        let (config_path, config) = if config_path.is_file() {
            let text = fs_err::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::InvalidModel {
                path: config_path.clone(),
                reason: format!("not valid JSON: {e}"),
            })?;
            if !value.is_object() {
                return Err(Error::InvalidModel { path: config_path, reason: "must be a JSON object".into() });
            }
            (Some(config_path), Some(value))
        } else {
            (None, None)
        };
        let index_path = path.join("model.safetensors.index.json");
        let single = path.join("model.safetensors");
        let (index_path, shards) = if index_path.is_file() {
            let text = fs_err::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: Index = serde_json::from_str(&text).map_err(|e| Error::InvalidModel {
                path: index_path.clone(),
                reason: format!("not a valid safetensors index: {e}"),
            })?;
            let files: std::collections::BTreeSet<&String> = index.weight_map.values().collect();
            let mut shards = Vec::new();
            for f in &files {
                if f.contains('/') || f.contains('\\') || f.as_str() == ".." {
                    return Err(Error::InvalidModel {
                        path: index_path.clone(),
                        reason: format!("shard file name {f:?} must be a plain file name in the model directory"),
                    });
                }
                shards.push(SafetensorsFile::open(&path.join(f))?);
            }
            // Every mapped tensor must be in its shard, and every shard tensor must be mapped.
            for (name, file) in &index.weight_map {
                let si = files.iter().position(|f| *f == file).expect("from the same map");
                if shards[si].get(name).is_none() {
                    return Err(Error::InvalidModel {
                        path: index_path.clone(),
                        reason: format!("tensor {name:?} is mapped to {file} but that shard does not contain it"),
                    });
                }
            }
            for s in &shards {
                for t in s.tensors() {
                    if !index.weight_map.contains_key(&t.name) {
                        return Err(Error::InvalidModel {
                            path: index_path.clone(),
                            reason: format!("tensor {:?} of {} is missing from weight_map", t.name, s.path().display()),
                        });
                    }
                }
            }
            (Some(index_path), shards)
        } else if single.is_file() {
            (None, vec![SafetensorsFile::open(&single)?])
        } else {
            return Err(Error::InvalidModel {
                path: path.to_path_buf(),
                reason: "no model.safetensors or model.safetensors.index.json in this directory".into(),
            });
        };
        let aux = AUX_FILES.iter().map(|f| path.join(f)).filter(|p| p.is_file()).collect();
        Self::assemble(path, config_path, config, index_path, shards, aux)
    }

    fn assemble(
        path: &Path,
        config_path: Option<PathBuf>,
        config: Option<serde_json::Value>,
        index_path: Option<PathBuf>,
        shards: Vec<SafetensorsFile>,
        aux: Vec<PathBuf>,
    ) -> Result<Self> {
        let mut tensors: Vec<TensorRef> = shards
            .iter()
            .enumerate()
            .flat_map(|(shard, s)| (0..s.tensors().len()).map(move |idx| TensorRef { shard, idx }))
            .collect();
        let name = |r: &TensorRef| shards[r.shard].tensors()[r.idx].name.clone();
        tensors.sort_by_key(name);
        if let Some(w) = tensors.windows(2).find(|w| name(&w[0]) == name(&w[1])) {
            return Err(Error::InvalidModel {
                path: path.to_path_buf(),
                reason: format!(
                    "tensor {:?} appears in both {} and {}",
                    name(&w[0]),
                    shards[w[0].shard].path().display(),
                    shards[w[1].shard].path().display()
                ),
            });
        }
        Ok(Self { path: path.to_path_buf(), config_path, config, index_path, shards, tensors, aux })
    }

    /// The path this model was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Parsed `config.json`, if the model has one.
    pub fn config(&self) -> Option<&serde_json::Value> {
        self.config.as_ref()
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> &[TensorRef] {
        &self.tensors
    }

    /// Metadata of one tensor.
    pub fn info(&self, r: &TensorRef) -> &TensorInfo {
        &self.shards[r.shard].tensors()[r.idx]
    }

    /// Data of one tensor.
    pub fn view(&self, r: &TensorRef) -> TensorView<'_> {
        let s = &self.shards[r.shard];
        s.view(&s.tensors()[r.idx])
    }

    /// Drops one tensor's pages from memory after use (see [`SafetensorsFile::release`]).
    pub fn release(&self, r: &TensorRef) {
        let s = &self.shards[r.shard];
        s.release(&s.tensors()[r.idx]);
    }

    /// The safetensors files read.
    pub fn shards(&self) -> &[SafetensorsFile] {
        &self.shards
    }

    /// Auxiliary files (tokenizer and friends) to copy into a bundle.
    pub fn aux_files(&self) -> &[PathBuf] {
        &self.aux
    }

    /// Every input file read, for hashing into a manifest: config, index, shards, aux files.
    pub fn input_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.config_path.iter().chain(self.index_path.iter()).cloned().collect();
        v.extend(self.shards.iter().map(|s| s.path().to_path_buf()));
        v.extend(self.aux.iter().cloned());
        v.sort();
        v
    }

    /// Total number of elements over all tensors.
    pub fn params(&self) -> u64 {
        self.tensors.iter().map(|r| self.info(r).numel() as u64).sum()
    }

    /// Total size of the weight files in bytes.
    pub fn weight_bytes(&self) -> u64 {
        self.shards.iter().map(SafetensorsFile::len).sum()
    }
}
