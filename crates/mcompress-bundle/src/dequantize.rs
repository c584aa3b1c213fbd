//! `mcompress dequantize`: a bundle back to a dense safetensors file, for runtimes that do not
//! read the packed layout and for checking a bundle against the original weights.

use std::collections::BTreeMap;
use std::path::Path;

use mcompress_core::{DType, ModelSource, SafetensorsLayout, SafetensorsWriter, TensorEntry};
use mcompress_passes::quant::{load_quantized, schemes_from_config};

use crate::{Error, Result};

/// Writes every tensor of the model or bundle at `src` to `out`, with quantized matrices
/// dequantized to `dtype` (a float type) under their original names and shapes. Other tensors
/// are copied unchanged; pruned matrices stored sparse-bitmask are expanded to dense (in their
/// dtype). Returns the number of matrices dequantized or expanded.
pub fn dequantize(src: &Path, out: &Path, dtype: DType) -> Result<usize> {
    let model = ModelSource::open(src)?;
    check_out(&model, out)?;
    let bad = |reason: String| Error::BadBundle { path: src.to_path_buf(), reason };
    let schemes = match model.config() {
        Some(c) => schemes_from_config(c).map_err(|e| bad(format!("config.json: {e}")))?,
        None => BTreeMap::new(),
    };
    let names: std::collections::BTreeSet<String> =
        model.tensors().iter().map(|r| model.info(r).name.clone()).collect();
    let mut quantized = BTreeMap::new();
    for (module, scheme) in &schemes {
        let name = if scheme.is_fp8() || names.contains(&format!("{module}.weight_packed")) {
            format!("{module}.weight")
        } else {
            module.clone()
        };
        let q = load_quantized(&model, &name, *scheme).map_err(|e| bad(format!("{name}: {e}")))?;
        quantized.insert(name, q);
    }
    // Pruned matrices stored sparse-bitmask (`X.compressed`, `X.bitmask`, `X.shape`, `X.row_offsets`).
    let mut sparse = BTreeMap::new();
    for r in model.tensors() {
        if let Some(m) = model.info(r).name.strip_suffix(".bitmask") {
            let name = format!("{m}.weight");
            if let Some(t) =
                mcompress_passes::sparse::SparseTensor::load(&model, &name).map_err(|e| bad(format!("{name}: {e}")))?
            {
                sparse.insert(name, t);
            }
        }
    }
    let sparse_parts: std::collections::BTreeSet<String> =
        sparse.keys().flat_map(|n| mcompress_passes::sparse::names(n)).collect();
    let part_of_quantized = |n: &str| {
        sparse_parts.contains(n)
            || quantized.contains_key(n)
            || ["_packed", "_scale", "_zero_point", "_shape", "_global_scale"]
                .iter()
                .any(|s| n.strip_suffix(s).is_some_and(|b| quantized.contains_key(b)))
    };
    let mut entries = Vec::new();
    for r in model.tensors() {
        let i = model.info(r);
        if !part_of_quantized(&i.name) {
            entries.push(TensorEntry { name: i.name.clone(), dtype: i.dtype, shape: i.shape.clone() });
        }
    }
    for (name, q) in &quantized {
        entries.push(TensorEntry { name: name.clone(), dtype, shape: q.shape.clone() });
    }
    for (name, t) in &sparse {
        entries.push(TensorEntry { name: name.clone(), dtype: t.dtype, shape: t.shape.clone() });
    }
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    // Written beside `out` under a name of this process and renamed into place; removed on any
    // error, and a leftover of a killed run is removed by the next run that writes `out`.
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    remove_stale_tmp(parent, &name);
    let tmp = parent.join(format!(".{name}.mcompress-tmp-{}", std::process::id()));
    let written = (|| {
        let mut w = SafetensorsWriter::create(&tmp, SafetensorsLayout::new(entries, &meta)?)?;
        for r in model.tensors() {
            let v = model.view(r);
            if !part_of_quantized(v.name) {
                w.write_tensor(v.name, &v.data)?;
            }
        }
        for (name, q) in &quantized {
            let bytes =
                dtype.encode_f32(&q.dequantize()).ok_or_else(|| bad(format!("--dtype {dtype} is not a float type")))?;
            w.write_tensor(name, &bytes)?;
        }
        for (name, t) in &sparse {
            let bytes = t.dtype.encode_f32(&t.to_dense()).ok_or_else(|| bad(format!("{name}: not a float tensor")))?;
            w.write_tensor(name, &bytes)?;
        }
        w.finish()?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs_err::remove_file(&tmp);
        return Err(e);
    }
    fs_err::rename(&tmp, out).map_err(crate::io(out))?;
    Ok(quantized.len() + sparse.len())
}

/// Refuses an output that would destroy what it reads or what the tool did not write: one of the
/// model's own files, a path inside a bundle (its manifest would no longer match), or anything
/// but a regular file.
fn check_out(model: &ModelSource, out: &Path) -> Result<()> {
    let unsafe_out = |reason: String| Error::UnsafeOutput { path: out.to_path_buf(), reason };
    if let Ok(m) = std::fs::symlink_metadata(out)
        && !m.is_file()
    {
        return Err(unsafe_out("exists and is not a regular file".into()));
    }
    if let Ok(o) = fs_err::canonicalize(out) {
        for f in model.input_files() {
            if fs_err::canonicalize(&f).is_ok_and(|f| f == o) {
                return Err(unsafe_out(format!("is the input file {} (choose another --out)", f.display())));
            }
        }
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if parent.join("manifest.json").exists() {
        return Err(unsafe_out(format!(
            "is inside the bundle {} (it has a manifest.json, which a new file would no longer match): \
             write it outside the bundle",
            parent.display()
        )));
    }
    Ok(())
}

/// Removes `.NAME.mcompress-tmp-PID` files in `dir` whose process is gone.
fn remove_stale_tmp(dir: &Path, name: &str) {
    let Ok(rd) = fs_err::read_dir(dir) else { return };
    let prefix = format!(".{name}.mcompress-tmp-");
    for e in rd.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = fs_err::remove_file(e.path());
        }
    }
}
