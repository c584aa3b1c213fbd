//! Model sources: a Hugging Face style directory, a single `.safetensors` file, or a llama
//! `.gguf` file (dequantized tensor by tensor to f32 under Hugging Face names, Q/K un-permuted,
//! with a config.json and tokenizer.json derived from its metadata).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::arch::{Family, Geometry, Role};
use crate::gguf::{self, GgufFile};
use crate::{DType, Error, Result, SafetensorsFile, TensorInfo, TensorView};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    gguf: Option<GgufSource>,
    tensors: Vec<TensorRef>,
    aux: Vec<PathBuf>,
    generated: Vec<(String, Vec<u8>)>,
    /// Tensors shown under another name ([`ModelSource::restructured`]).
    renamed: std::collections::HashMap<TensorRef, TensorInfo>,
}

/// A GGUF file presented as Hugging Face-named f32 tensors.
struct GgufSource {
    path: PathBuf,
    map: memmap2::Mmap,
    file: GgufFile,
    /// Per exposed tensor, in name order.
    entries: Vec<GgufEntry>,
}

/// One GGUF tensor as exposed.
struct GgufEntry {
    /// Hugging Face name, F32, row-major shape.
    info: TensorInfo,
    /// Index of the GGUF tensor.
    index: usize,
    /// Head count to un-permute Q/K rows with (llama).
    heads: Option<usize>,
    /// Subtracted from every value (Gemma's norms, stored as `1 + w`).
    offset: f32,
    /// One expert of a stacked tensor: (its index, the experts in the stack); its rows are the
    /// stack's bytes cut in that many equal parts.
    part: Option<(usize, usize)>,
}

impl GgufEntry {
    /// The bytes of this entry in the file.
    fn range(&self, file: &GgufFile) -> (usize, usize) {
        let (s, e) = file.tensors[self.index].range;
        match self.part {
            Some((i, n)) => {
                let len = (e - s) / n.max(1);
                (s + i * len, s + (i + 1) * len)
            }
            None => (s, e),
        }
    }
}

impl std::fmt::Debug for GgufSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufSource")
            .field("path", &self.path)
            .field("tensors", &self.entries.len())
            .finish_non_exhaustive()
    }
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
        if !meta.is_dir() && path.extension().is_some_and(|e| e == "gguf") {
            return Self::open_gguf(path);
        }
        if !meta.is_dir() {
            let shard = SafetensorsFile::open(path)?;
            return Self::assemble(path, None, None, None, vec![shard], Vec::new());
        }
        let config_path = path.join("config.json");
        let (config_path, config) = if config_path.is_file() {
            let text = crate::fsutil::read_regular(&config_path, crate::fsutil::MAX_JSON_BYTES)
                .map_err(|e| Error::io(&config_path, e))?;
            let value: serde_json::Value = serde_json::from_slice(&text).map_err(|e| Error::InvalidModel {
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
            let text = crate::fsutil::read_regular(&index_path, crate::fsutil::MAX_JSON_BYTES)
                .map_err(|e| Error::io(&index_path, e))?;
            let index: Index = serde_json::from_slice(&text).map_err(|e| Error::InvalidModel {
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
        let mut aux: Vec<PathBuf> = AUX_FILES.iter().map(|f| path.join(f)).filter(|p| is_regular(p)).collect();
        aux.extend(module_files(path)?);
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
        if tensors.is_empty() {
            return Err(Error::InvalidModel {
                path: path.to_path_buf(),
                reason: "holds no tensors (an empty safetensors header)".into(),
            });
        }
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
        Ok(Self {
            path: path.to_path_buf(),
            config_path,
            config,
            index_path,
            shards,
            gguf: None,
            tensors,
            aux,
            generated: Vec::new(),
            renamed: std::collections::HashMap::new(),
        })
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        crate::fsutil::check_regular(path)?;
        let file = fs_err::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only private mapping; see `SafetensorsFile::open`.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::MmapOptions::new().map(file.file()) }.map_err(|e| Error::io(path, e))?;
        let parsed = GgufFile::parse(path, &map)?;
        let bad = |reason: String| Error::InvalidModel { path: path.to_path_buf(), reason };
        let arch_name = parsed.get("general.architecture").and_then(gguf::GgufValue::as_str).unwrap_or("");
        let family = Family::from_gguf(arch_name).ok_or_else(|| {
            bad(format!("GGUF architecture {arch_name:?}: the decoder families read are llama, qwen2, gemma3 and phi3"))
        })?;
        let arch = family.gguf_arch();
        // A llama with experts is a Mixtral (what llama.cpp's converter writes for one).
        let experts = parsed.get(&format!("{arch}.expert_count")).and_then(gguf::GgufValue::as_u64).unwrap_or(0);
        let family = if experts > 0 && family == Family::Llama { Family::Mixtral } else { family };
        if experts > 0 && !family.is_moe() || experts > crate::arch::MAX_EXPERTS as u64 {
            return Err(bad(format!(
                "GGUF: {arch}.expert_count = {experts}: a {arch} mixture of experts is not read (at most {} experts, \
                 llama layout)",
                crate::arch::MAX_EXPERTS
            )));
        }
        let meta_u = |k: &str| {
            parsed
                .get(k)
                .and_then(gguf::GgufValue::as_u64)
                .ok_or_else(|| bad(format!("GGUF: missing or non-integer {k}")))
        };
        let n_head = meta_u(&format!("{arch}.attention.head_count"))? as usize;
        let n_kv = parsed
            .get(&format!("{arch}.attention.head_count_kv"))
            .and_then(gguf::GgufValue::as_u64)
            .map_or(n_head, |v| v as usize);
        if n_head == 0 || n_kv == 0 || !n_head.is_multiple_of(n_kv) || n_head > MAX_HEADS {
            return Err(bad(format!(
                "GGUF: {arch}.attention.head_count {n_head} and {arch}.attention.head_count_kv {n_kv}: both must be positive \
                 (at most {MAX_HEADS}), the heads a multiple of the kv heads"
            )));
        }
        let mut entries = Vec::new();
        for (i, t) in parsed.tensors.iter().enumerate() {
            let (role, layer) = family
                .parse_gguf(&t.name)
                .ok_or_else(|| bad(format!("GGUF: unexpected {arch} tensor {:?}", t.name)))?;
            let heads = family.gguf_permute_heads(role, n_head, n_kv);
            let offset = family.gguf_offset(role);
            let shape = t.shape();
            if role.per_expert() {
                // A stack of experts: one entry per expert, each its own contiguous rows.
                let n = experts as usize;
                if shape.len() != 3 || shape[0] != n || !(t.range.1 - t.range.0).is_multiple_of(n) {
                    return Err(bad(format!(
                        "GGUF: tensor {:?} of shape {shape:?} is not a stack of {n} expert matrices",
                        t.name
                    )));
                }
                for e in 0..n {
                    let name = family.hf_expert(role, layer.unwrap_or(0), e);
                    let bytes = shape[1] * shape[2] * 4;
                    entries.push(GgufEntry {
                        info: TensorInfo {
                            name,
                            dtype: DType::F32,
                            shape: shape[1..].to_vec(),
                            data_offsets: (0, bytes),
                        },
                        index: i,
                        heads: None,
                        offset,
                        part: Some((e, n)),
                    });
                }
                continue;
            }
            let name = family.hf(role, layer.unwrap_or(0));
            if let Some(h) = heads
                && (shape.len() != 2 || !shape[0].is_multiple_of(2 * h.max(1)))
            {
                return Err(bad(format!(
                    "GGUF: tensor {:?} of shape {shape:?} cannot be un-permuted over {h} heads",
                    t.name
                )));
            }
            let n = t.numel() * 4;
            entries.push(GgufEntry {
                info: TensorInfo { name, dtype: DType::F32, shape, data_offsets: (0, n) },
                index: i,
                heads,
                offset,
                part: None,
            });
        }
        entries.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        if let Some(w) = entries.windows(2).find(|w| w[0].info.name == w[1].info.name) {
            return Err(bad(format!("GGUF: two tensors map to {:?}", w[0].info.name)));
        }
        let output = family.hf(Role::Output, 0);
        let has_output = entries.iter().any(|e| e.info.name == output);
        let config = crate::arch::gguf_config(&parsed, family, has_output).map_err(bad)?;
        // Whether the tensors make a whole model is `check_architecture`'s (run, recipe check) and
        // the eval's question; inspect and dequantize read any well-formed file.
        let tokenizer = gguf_tokenizer(&parsed).map_err(bad)?;
        let tensors = (0..entries.len()).map(|idx| TensorRef { shard: 0, idx }).collect();
        let mut generated = Vec::new();
        if let Some(t) = tokenizer {
            generated.push(("tokenizer.json".to_string(), t));
            generated.extend(gguf_tokenizer_files(&parsed));
        }
        Ok(Self {
            path: path.to_path_buf(),
            config_path: None,
            config: Some(config),
            index_path: None,
            shards: Vec::new(),
            gguf: Some(GgufSource { path: path.to_path_buf(), map, file: parsed, entries }),
            tensors,
            aux: Vec::new(),
            generated,
            renamed: std::collections::HashMap::new(),
        })
    }

    /// A GGUF source's metadata as stored: (key, GGUF type id, encoded value), in key order;
    /// empty for other sources. What a GGUF writer copies to keep the tokenizer and exact types.
    pub fn gguf_raw_metadata(&self) -> Vec<(&str, u32, &[u8])> {
        self.gguf.as_ref().map_or_else(Vec::new, |g| {
            g.file.raw.iter().map(|(k, (ty, (s, e)))| (k.as_str(), *ty, &g.map[*s..*e])).collect()
        })
    }

    /// The path this model was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Parsed `config.json`, if the model has one.
    pub fn config(&self) -> Option<&serde_json::Value> {
        self.config.as_ref()
    }

    /// The completeness check for a decoder (config.json `model_type` of a family in
    /// [`crate::arch`]): the config parses, and every tensor is one the family has with the shape
    /// the config gives it, none missing. Models of other kinds, and weights already compressed
    /// (a `quantization_config`), pass unchecked here (their readers check them).
    ///
    /// # Errors
    /// [`Error::InvalidModel`] naming the file and the first tensor or key at fault.
    pub fn check_architecture(&self) -> Result<()> {
        let Some(config) = &self.config else { return Ok(()) };
        if Family::of_config(config).is_none() || !config["quantization_config"].is_null() {
            return Ok(());
        }
        let path = self.config_path.clone().unwrap_or_else(|| self.path.clone());
        let bad = |reason: String| Error::InvalidModel { path: path.clone(), reason };
        let g = Geometry::from_config(config).map_err(bad)?;
        g.check_tensors(self.tensors.iter().map(|r| {
            let i = self.info(r);
            (i.name.as_str(), i.shape.as_slice())
        }))
        .map_err(|e| Error::InvalidModel { path: self.path.clone(), reason: e })
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> &[TensorRef] {
        &self.tensors
    }

    /// The same model with tensors left out or renamed and another config.json: what structured
    /// pruning of whole layers leaves (`model.layers.7.*` gone, `model.layers.8.*` read as
    /// `model.layers.7.*`). `rename` maps each tensor name to its new one, `None` drops it. The
    /// files are not touched; everything downstream sees the smaller model.
    ///
    /// # Errors
    /// Two tensors renamed to the same name.
    pub fn restructured(mut self, rename: impl Fn(&str) -> Option<String>, config: serde_json::Value) -> Result<Self> {
        let mut kept = Vec::with_capacity(self.tensors.len());
        let mut renamed = std::collections::HashMap::new();
        for r in self.tensors.clone() {
            let info = self.info(&r);
            let Some(name) = rename(&info.name) else { continue };
            if name != info.name {
                renamed.insert(r, TensorInfo { name, ..info.clone() });
            }
            kept.push(r);
        }
        self.renamed = renamed;
        kept.sort_by(|a, b| self.info(a).name.cmp(&self.info(b).name));
        if let Some(dup) = kept.windows(2).find_map(|w| {
            let (a, b) = (self.info(&w[0]), self.info(&w[1]));
            (a.name == b.name).then(|| a.name.clone())
        }) {
            return Err(Error::InvalidModel {
                path: self.path.clone(),
                reason: format!("restructured: two tensors named {dup:?}"),
            });
        }
        self.tensors = kept;
        self.config = Some(config);
        Ok(self)
    }

    /// Metadata of one tensor.
    pub fn info(&self, r: &TensorRef) -> &TensorInfo {
        if let Some(i) = self.renamed.get(r) {
            return i;
        }
        match &self.gguf {
            Some(g) => &g.entries[r.idx].info,
            None => &self.shards[r.shard].tensors()[r.idx],
        }
    }

    /// Data of one tensor. GGUF tensors are dequantized (and Q/K un-permuted) on each call.
    #[allow(clippy::single_match_else)] // two backends; a match reads better than if-let-else here
    pub fn view(&self, r: &TensorRef) -> TensorView<'_> {
        let mut v = self.view_stored(r);
        if let Some(i) = self.renamed.get(r) {
            v.name = &i.name;
        }
        v
    }

    #[allow(clippy::single_match_else)] // two backends; a match reads better than if-let-else here
    fn view_stored(&self, r: &TensorRef) -> TensorView<'_> {
        match &self.gguf {
            Some(g) => {
                let entry = &g.entries[r.idx];
                let GgufEntry { info, index, heads, offset, .. } = entry;
                let t = &g.file.tensors[*index];
                let (start, end) = entry.range(&g.file);
                let mut v = Vec::with_capacity(info.shape.iter().product());
                gguf::dequantize(t.ggml_type, &g.map[start..end], &mut v);
                if let Some(h) = heads {
                    let cols = info.shape[1..].iter().product();
                    v = gguf::unpermute_rows(&v, info.shape[0], cols, *h).expect("shape checked at open");
                }
                if *offset != 0.0 {
                    for x in &mut v {
                        *x -= offset;
                    }
                }
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                TensorView {
                    name: &info.name,
                    dtype: DType::F32,
                    shape: &info.shape,
                    data: std::borrow::Cow::Owned(bytes),
                }
            }
            None => {
                let s = &self.shards[r.shard];
                s.view(&s.tensors()[r.idx])
            }
        }
    }

    /// Drops one tensor's pages from memory after use (see [`SafetensorsFile::release`]).
    #[allow(clippy::single_match_else)] // two backends, as in `view`
    pub fn release(&self, r: &TensorRef) {
        match &self.gguf {
            Some(g) => {
                let (s, e) = g.entries[r.idx].range(&g.file);
                let page = 4096;
                let (start, end) = (s.div_ceil(page) * page, e / page * page);
                if end > start {
                    // SAFETY: as in `SafetensorsFile::release`: a private read-only mapping.
                    #[allow(unsafe_code)]
                    let _ =
                        unsafe { g.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
                }
            }
            None => {
                let s = &self.shards[r.shard];
                s.release(&s.tensors()[r.idx]);
            }
        }
    }

    /// How one tensor is stored in the input: its dtype as the file names it (`BF16`, or a GGUF
    /// type like `Q4_1`) and its bytes there. Reads no tensor data.
    #[allow(clippy::single_match_else)] // two backends, as in `view`
    pub fn stored(&self, r: &TensorRef) -> (String, u64) {
        match &self.gguf {
            Some(g) => {
                let entry = &g.entries[r.idx];
                let (s, e) = entry.range(&g.file);
                (g.file.tensors[entry.index].ggml_type.name().to_string(), (e - s) as u64)
            }
            None => {
                let i = self.info(r);
                (i.dtype.to_string(), i.nbytes() as u64)
            }
        }
    }

    /// Tensors in the order their bytes lie in the input files, for sequential reading.
    pub fn read_order(&self) -> Vec<TensorRef> {
        let mut v = self.tensors.clone();
        match &self.gguf {
            Some(g) => v.sort_by_key(|r| g.entries[r.idx].range(&g.file).0),
            None => v.sort_by_key(|r| (r.shard, self.shards[r.shard].tensors()[r.idx].data_offsets.0)),
        }
        v
    }

    /// Files derived from the input rather than copied (a GGUF's tokenizer.json), as (name, bytes).
    pub fn generated_files(&self) -> &[(String, Vec<u8>)] {
        &self.generated
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
        v.extend(self.gguf.iter().map(|g| g.path.clone()));
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
        self.shards.iter().map(SafetensorsFile::len).sum::<u64>() + self.gguf.as_ref().map_or(0, |g| g.map.len() as u64)
    }
}

/// A regular file, not followed through a symlink (a linked tokenizer would ship its target).
fn is_regular(p: &Path) -> bool {
    fs_err::symlink_metadata(p).is_ok_and(|m| m.is_file())
}

/// The files of the sentence-transformers module directories that `modules.json` names
/// (`1_Pooling/config.json`, `2_Dense/…`): a bundle without them loads in sentence-transformers
/// as a different pipeline. Each `path` must be one plain directory name inside the model
/// directory; regular files directly inside it are taken, symlinks and subdirectories are not.
fn module_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let modules_json = dir.join("modules.json");
    if !is_regular(&modules_json) {
        return Ok(Vec::new());
    }
    let bad = |reason: String| Error::InvalidModel { path: modules_json.clone(), reason };
    let len = fs_err::metadata(&modules_json).map_err(|e| Error::io(&modules_json, e))?.len();
    if len > 1 << 20 {
        return Err(bad(format!("{len} bytes; a modules.json over 1 MiB is not read")));
    }
    let text = crate::fsutil::read_regular(&modules_json, crate::fsutil::MAX_JSON_BYTES)
        .map_err(|e| Error::io(&modules_json, e))?;
    let modules: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let list = modules.as_array().ok_or_else(|| bad("must be a list of modules".into()))?;
    let mut out = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let sub = m["path"].as_str().unwrap_or_default();
        if sub.is_empty() {
            continue;
        }
        if sub.contains(['/', '\\']) || sub == "." || sub == ".." || sub.starts_with('.') {
            return Err(bad(format!("module {i}: path {sub:?} must be one directory name inside the model directory")));
        }
        let d = dir.join(sub);
        // A module without files (Normalize) may have no directory at all.
        if !fs_err::symlink_metadata(&d).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let mut files: Vec<PathBuf> = fs_err::read_dir(&d)
            .map_err(|e| Error::io(&d, e))?
            .filter_map(std::result::Result::ok)
            .map(|e| e.path())
            .filter(|p| is_regular(p))
            .collect();
        files.sort();
        out.extend(files);
    }
    Ok(out)
}

/// Largest head count a GGUF may declare.
const MAX_HEADS: usize = 1 << 12;

/// `tokenizer_config.json`, `special_tokens_map.json` and `generation_config.json` from a GGUF's
/// tokenizer metadata (special token ids, `tokenizer.chat_template`, add-BOS), as
/// transformers expects them beside a tokenizer.json: without them `apply_chat_template` and
/// `generate` do not know the template or when to stop.
fn gguf_tokenizer_files(g: &GgufFile) -> Vec<(String, Vec<u8>)> {
    let tokens: Vec<&str> = g
        .get("tokenizer.ggml.tokens")
        .and_then(gguf::GgufValue::as_array)
        .map(|a| a.iter().filter_map(gguf::GgufValue::as_str).collect())
        .unwrap_or_default();
    let id = |k: &str| g.get(&format!("tokenizer.ggml.{k}_token_id")).and_then(gguf::GgufValue::as_u64);
    let token =
        |k: &str| id(k).and_then(|i| usize::try_from(i).ok()).and_then(|i| tokens.get(i)).map(|t| (*t).to_string());
    let flag = |k: &str| g.get(&format!("tokenizer.ggml.{k}")).and_then(gguf::GgufValue::as_bool);
    let mut special = serde_json::Map::new();
    for (key, role) in [("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")]
    {
        if let Some(t) = token(role) {
            special.insert(key.into(), t.into());
        }
    }
    let mut tc = special.clone();
    tc.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    tc.insert("add_bos_token".into(), flag("add_bos_token").unwrap_or(false).into());
    tc.insert("add_eos_token".into(), flag("add_eos_token").unwrap_or(false).into());
    tc.insert("clean_up_tokenization_spaces".into(), false.into());
    if let Some(ctx) = g
        .get(&format!(
            "{}.context_length",
            g.get("general.architecture").and_then(gguf::GgufValue::as_str).unwrap_or("llama")
        ))
        .and_then(gguf::GgufValue::as_u64)
    {
        tc.insert("model_max_length".into(), ctx.into());
    }
    if let Some(t) = g.get("tokenizer.chat_template").and_then(gguf::GgufValue::as_str) {
        tc.insert("chat_template".into(), t.into());
    }
    let mut generation = serde_json::Map::new();
    for (key, role) in [("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")] {
        if let Some(i) = id(role) {
            generation.insert(key.into(), i.into());
        }
    }
    let pretty = |m: serde_json::Map<String, serde_json::Value>| {
        let mut v = serde_json::to_vec_pretty(&serde_json::Value::Object(m)).expect("JSON");
        v.push(b'\n');
        v
    };
    vec![
        ("generation_config.json".into(), pretty(generation)),
        ("special_tokens_map.json".into(), pretty(special)),
        ("tokenizer_config.json".into(), pretty(tc)),
    ]
}

/// Qwen2's pre-tokenizer regex (llama.cpp's `qwen2` pre type; transformers' Qwen2 tokenizer.json).
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// tokenizer.json for a GGUF's vocabulary, through the `tokenizers` crate's JSON format:
/// GPT-2 style byte-level BPE (`tokenizer.ggml.model = "gpt2"`) split as llama.cpp's pre type
/// says (`smollm`/`default`: digits one by one, then byte-level; `qwen2`: Qwen2's regex, NFC),
/// or SentencePiece BPE (`llama`, Gemma's) with merges rebuilt from the scores. `None` when the
/// file carries no vocabulary; an error for a vocabulary kind or pre type we would split wrongly.
fn gguf_tokenizer(g: &GgufFile) -> std::result::Result<Option<Vec<u8>>, String> {
    let Some(model) = g.get("tokenizer.ggml.model").and_then(gguf::GgufValue::as_str) else { return Ok(None) };
    let strings = |k: &str| -> std::result::Result<Vec<&str>, String> {
        g.get(k)
            .and_then(gguf::GgufValue::as_array)
            .and_then(|a| a.iter().map(gguf::GgufValue::as_str).collect::<Option<_>>())
            .ok_or_else(|| format!("GGUF: {k} missing or not a list of strings"))
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let types: Vec<u64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(gguf::GgufValue::as_array)
        .map(|a| a.iter().map(|t| t.as_u64().unwrap_or(1)).collect())
        .unwrap_or_default();
    // Control (3) and user-defined (4) tokens match as whole strings before the model runs.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3 | 4)))
        .map(|(i, s)| serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": types.get(i) == Some(&3)}))
        .collect();
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(i, s)| ((*s).to_string(), serde_json::json!(i))).collect();
    let tj = match model {
        "gpt2" => {
            let merges = strings("tokenizer.ggml.merges")?;
            let pre = g.get("tokenizer.ggml.pre").and_then(gguf::GgufValue::as_str).unwrap_or("default");
            let (normalizer, pre_tokenizer) = match pre {
                "smollm" | "default" => (
                    serde_json::Value::Null,
                    serde_json::json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Digits", "individual_digits": true},
                        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]}),
                ),
                "qwen2" => (
                    serde_json::json!({"type": "NFC"}),
                    serde_json::json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]}),
                ),
                other => {
                    return Err(format!(
                        "GGUF: tokenizer.ggml.pre {other:?}: this pre-tokenizer is not converted (smollm, default and qwen2 are)"
                    ));
                }
            };
            serde_json::json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": normalizer,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                          "vocab": vocab, "merges": merges},
            })
        }
        "llama" => {
            let scores: Vec<f64> = g
                .get("tokenizer.ggml.scores")
                .and_then(gguf::GgufValue::as_array)
                .and_then(|a| a.iter().map(gguf::GgufValue::as_f64).collect::<Option<_>>())
                .ok_or("GGUF: tokenizer.ggml.scores missing or not numbers")?;
            if scores.len() != tokens.len() {
                return Err(format!("GGUF: {} scores for {} tokens", scores.len(), tokens.len()));
            }
            let space_prefix =
                g.get("tokenizer.ggml.add_space_prefix").and_then(gguf::GgufValue::as_bool).unwrap_or(true);
            let unk = g
                .get("tokenizer.ggml.unknown_token_id")
                .and_then(gguf::GgufValue::as_u64)
                .and_then(|i| tokens.get(usize::try_from(i).ok()?))
                .map(|t| (*t).to_string());
            let mut normalizers = Vec::new();
            if space_prefix {
                normalizers.push(serde_json::json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            normalizers.push(serde_json::json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
            serde_json::json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": normalizers},
                "pre_tokenizer": null,
                "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"}]},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                          "vocab": vocab, "merges": spm_merges(&tokens, &scores, &types)},
            })
        }
        other => {
            return Err(format!(
                "GGUF: tokenizer.ggml.model {other:?}: only gpt2 (BPE) and llama (SentencePiece) vocabularies are converted"
            ));
        }
    };
    serde_json::to_vec(&tj).map(Some).map_err(|e| format!("GGUF: tokenizer: {e}"))
}

/// BPE merges of a SentencePiece vocabulary, as transformers' `SentencePieceExtractor` derives
/// them: every split of a normal token into two normal tokens is a merge, ranked by the merged
/// token's score (higher first), then by the pieces' ids.
fn spm_merges(tokens: &[&str], scores: &[f64], types: &[u64]) -> Vec<serde_json::Value> {
    let normal = |i: usize| types.get(i).is_none_or(|&t| t == 1);
    let ids: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().filter(|(i, _)| normal(*i)).map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if !normal(i) || t.chars().count() < 2 {
            continue;
        }
        for (cut, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(cut);
            if let (Some(&ia), Some(&ib)) = (ids.get(a), ids.get(b)) {
                merges.push((scores[i], i, ia, ib));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)).then(x.3.cmp(&y.3)));
    // As pairs, not "a b" strings: a piece may contain a space.
    merges.into_iter().map(|(_, _, a, b)| serde_json::json!([tokens[a], tokens[b]])).collect()
}
