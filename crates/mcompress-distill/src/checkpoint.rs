//! Checkpoints: `checkpoint.json` (step, loss history, a fingerprint of the settings and the
//! trained tensor names) and `state.safetensors` (each trained tensor, AdamW's first and second
//! moments as `<name>.adam_m` / `<name>.adam_v`). Written to a temporary directory beside the
//! checkpoint and renamed over it, so a killed run leaves the previous checkpoint intact.

use std::collections::BTreeMap;
use std::path::Path;

use burn::optim::{AdamWState, AdaptiveMomentumState};
use burn::tensor::{Device, Tensor, TensorData};
use mcompress_passes::distill::DistillConfig;
use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};

use crate::{Error, Result, Trainable};

/// Settings that change what the training computes, and the trained tensors: a checkpoint of
/// other settings is refused on resume.
pub(crate) fn fingerprint(c: &DistillConfig, names: &[String]) -> String {
    let mut s = serde_json::to_value(c).expect("config is JSON");
    if let Some(o) = s.as_object_mut() {
        // Where checkpoints go and how often do not change the result.
        o.remove("checkpoint-every");
        o.remove("checkpoint-dir");
    }
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&s).expect("JSON"));
    for n in names {
        h.update(n.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// A loaded checkpoint.
pub(crate) struct Loaded {
    pub(crate) step: usize,
    pub(crate) losses: Vec<f64>,
    pub(crate) loss_before: Option<f64>,
    pub(crate) tensors: BTreeMap<String, (Tensor<2>, Option<AdamWState<2>>)>,
}

fn bad(dir: &Path, m: impl std::fmt::Display) -> Error {
    Error::Checkpoint(format!("{}: {m}", dir.display()))
}

fn read_f32(t: &Tensor<2>) -> Result<Vec<f32>> {
    t.clone()
        .inner()
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| Error::Checkpoint(format!("reading a tensor back: {e:?}")))
}

pub(crate) fn save(
    dir: &Path,
    fingerprint: &str,
    step: usize,
    losses: &[f64],
    loss_before: Option<f64>,
    ts: &[Trainable],
) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    fs_err::create_dir_all(parent).map_err(|e| bad(dir, e))?;
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    if tmp.exists() {
        fs_err::remove_dir_all(&tmp).map_err(|e| bad(&tmp, e))?;
    }
    fs_err::create_dir_all(&tmp).map_err(|e| bad(&tmp, e))?;
    let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut times = BTreeMap::new();
    for t in ts {
        let dims = t.param.dims().to_vec();
        let mut push = |name: String, x: &Tensor<2>| -> Result<()> {
            let v = read_f32(x)?;
            blobs.push((name, dims.clone(), v.iter().flat_map(|f| f.to_le_bytes()).collect()));
            Ok(())
        };
        push(t.name.clone(), &t.param)?;
        if let Some(s) = &t.state {
            push(format!("{}.adam_m", t.name), &s.momentum.moment_1)?;
            push(format!("{}.adam_v", t.name), &s.momentum.moment_2)?;
            times.insert(t.name.clone(), s.momentum.time);
        }
    }
    let views: Vec<(String, TensorView<'_>)> = blobs
        .iter()
        .map(|(n, d, b)| (n.clone(), TensorView::new(Dtype::F32, d.clone(), b).expect("consistent view")))
        .collect();
    safetensors::serialize_to_file(views, None, &tmp.join("state.safetensors")).map_err(|e| bad(&tmp, e))?;
    let meta = serde_json::json!({
        "format": mcompress_passes::distill::CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "step": step,
        "losses": losses,
        "loss_before": loss_before,
        "adam_time": times,
    });
    fs_err::write(tmp.join("checkpoint.json"), serde_json::to_vec_pretty(&meta).expect("JSON"))
        .map_err(|e| bad(&tmp, e))?;
    let old = dir.with_extension(format!("old-{}", std::process::id()));
    if dir.exists() {
        fs_err::rename(dir, &old).map_err(|e| bad(dir, e))?;
    }
    fs_err::rename(&tmp, dir).map_err(|e| bad(dir, e))?;
    if old.exists() {
        fs_err::remove_dir_all(&old).map_err(|e| bad(&old, e))?;
    }
    Ok(())
}

/// The checkpoint in `dir`, if there is one; an error if it belongs to other settings or is
/// damaged.
pub(crate) fn load(dir: &Path, fingerprint: &str, device: &Device) -> Result<Option<Loaded>> {
    let json = dir.join("checkpoint.json");
    if !json.is_file() {
        return Ok(None);
    }
    let meta: serde_json::Value = serde_json::from_slice(
        &mcompress_core::fsutil::read_regular(&json, mcompress_core::fsutil::MAX_JSON_BYTES)
            .map_err(|e| bad(&json, e))?,
    )
    .map_err(|e| bad(&json, e))?;
    if meta["fingerprint"].as_str() != Some(fingerprint) {
        return Err(bad(
            dir,
            "the checkpoint was written by a distill pass with other settings or tensors; \
             remove it or run without --resume",
        ));
    }
    let step = meta["step"].as_u64().ok_or_else(|| bad(&json, "step missing"))? as usize;
    let losses: Vec<f64> = meta["losses"]
        .as_array()
        .ok_or_else(|| bad(&json, "losses missing"))?
        .iter()
        .map(|v| v.as_f64().ok_or_else(|| bad(&json, "losses: not numbers")))
        .collect::<Result<_>>()?;
    if losses.len() != step {
        return Err(bad(&json, format!("{} losses for {step} steps", losses.len())));
    }
    let file = dir.join("state.safetensors");
    let bytes = mcompress_core::fsutil::read_regular(&file, u64::MAX).map_err(|e| bad(&file, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(&file, e))?;
    let get = |name: &str| -> Result<Option<Tensor<2>>> {
        let Ok(v) = st.tensor(name) else { return Ok(None) };
        let shape = v.shape();
        if v.dtype() != Dtype::F32 || shape.len() != 2 {
            return Err(bad(&file, format!("{name}: not an f32 matrix")));
        }
        let data: Vec<f32> =
            v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        Ok(Some(Tensor::from_data(TensorData::new(data, [shape[0], shape[1]]), device)))
    };
    let mut tensors = BTreeMap::new();
    for name in st.names() {
        if name.ends_with(".adam_m") || name.ends_with(".adam_v") {
            continue;
        }
        let p = get(name)?.expect("listed");
        let state = match (get(&format!("{name}.adam_m"))?, get(&format!("{name}.adam_v"))?) {
            (Some(m), Some(v)) => {
                let time =
                    meta["adam_time"][name].as_u64().ok_or_else(|| bad(&json, format!("{name}: adam time missing")))?;
                Some(AdamWState::new(AdaptiveMomentumState::new(time as usize, m, v)))
            }
            _ => None,
        };
        tensors.insert(name.to_string(), (p, state));
    }
    Ok(Some(Loaded { step, losses, loss_before: meta["loss_before"].as_f64(), tensors }))
}
