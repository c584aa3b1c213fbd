//! Every calibration window's activations (`[tokens, width]` each), held in memory while they fit
//! a budget and past it in an unlinked scratch file, read back one window at a time. The block-by-
//! block passes of [`crate::decoder::Decoder`] keep the residual stream of every window between
//! blocks; at 128 windows of 2048 tokens a 4096-wide model's stream alone is 4 GiB in f32, so a
//! real-size calibration must be able to leave it on disk. The numbers are the same either way.

use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::{Error, Result};

/// Where activations go when they exceed `budget` bytes (the same budget for the whole set a
/// pass holds at once: a trace holds three per block).
#[derive(Clone, Debug)]
pub struct Scratch {
    /// Directory of the scratch files (created unlinked: nothing is left behind, even on a kill).
    pub dir: PathBuf,
    /// Bytes of activations held in memory; more go to the scratch file.
    pub budget: u64,
}

impl Default for Scratch {
    /// Everything in memory.
    fn default() -> Self {
        Scratch { dir: std::env::temp_dir(), budget: u64::MAX }
    }
}

enum Store {
    Memory(Vec<Vec<f32>>),
    File(File),
}

/// One set of per-window activations.
pub(crate) struct Windows {
    /// Floats per window, and each window's offset in the file (in bytes).
    lens: Vec<usize>,
    offsets: Vec<u64>,
    store: Store,
}

fn io(what: &str, e: &std::io::Error) -> Error {
    Error::Model(format!("calibration scratch file ({what}): {e}"))
}

impl Windows {
    /// Room for windows of `lens` floats each: in memory when their bytes fit `budget`, else in a
    /// scratch file in `scratch.dir`. Every window starts zeroed.
    pub(crate) fn new(lens: Vec<usize>, scratch: &Scratch, budget: u64) -> Result<Self> {
        let mut offsets = Vec::with_capacity(lens.len());
        let mut total = 0u64;
        for l in &lens {
            offsets.push(total);
            total += *l as u64 * 4;
        }
        let store = if total <= budget {
            Store::Memory(lens.iter().map(|l| vec![0f32; *l]).collect())
        } else {
            let f = tempfile::tempfile_in(&scratch.dir)
                .map_err(|e| io(&format!("creating one in {}", scratch.dir.display()), &e))?;
            f.set_len(total).map_err(|e| io(&format!("sizing it to {total} bytes"), &e))?;
            Store::File(f)
        };
        Ok(Windows { lens, offsets, store })
    }

    /// `items` in memory or in the scratch file, as [`Windows::new`] decides for their sizes.
    #[cfg(test)]
    pub(crate) fn from_vecs(items: Vec<Vec<f32>>, scratch: &Scratch, budget: u64) -> Result<Self> {
        let mut w = Windows::new(items.iter().map(Vec::len).collect(), scratch, budget)?;
        for (i, v) in items.into_iter().enumerate() {
            w.set(i, v)?;
        }
        Ok(w)
    }

    /// Windows held.
    pub(crate) fn len(&self) -> usize {
        self.lens.len()
    }

    /// Whether the windows live in the scratch file.
    #[cfg(test)]
    pub(crate) fn spilled(&self) -> bool {
        matches!(self.store, Store::File(_))
    }

    /// Window `i`.
    pub(crate) fn get(&self, i: usize) -> Result<Cow<'_, [f32]>> {
        match &self.store {
            Store::Memory(v) => Ok(Cow::Borrowed(&v[i])),
            Store::File(f) => {
                let mut bytes = vec![0u8; self.lens[i] * 4];
                f.read_exact_at(&mut bytes, self.offsets[i]).map_err(|e| io("reading", &e))?;
                Ok(Cow::Owned(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()))
            }
        }
    }

    /// Replaces window `i` (the same length).
    pub(crate) fn set(&mut self, i: usize, v: Vec<f32>) -> Result<()> {
        debug_assert_eq!(v.len(), self.lens[i]);
        match &mut self.store {
            Store::Memory(m) => m[i] = v,
            Store::File(f) => {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                f.write_all_at(&bytes, self.offsets[i]).map_err(|e| io("writing", &e))?;
            }
        }
        Ok(())
    }

    /// Runs `f` on window `i` in place (read, changed, written back when spilled).
    pub(crate) fn update(&mut self, i: usize, f: impl FnOnce(&mut Vec<f32>) -> Result<()>) -> Result<()> {
        if let Store::Memory(m) = &mut self.store {
            return f(&mut m[i]);
        }
        let mut v = self.get(i)?.into_owned();
        f(&mut v)?;
        self.set(i, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_spilled_windows_read_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = Scratch { dir: dir.path().to_path_buf(), budget: 16 };
        let items = vec![vec![1.5f32, -2.0, 3.25], vec![f32::MIN_POSITIVE, 7.0], vec![]];
        let mem = Windows::from_vecs(items.clone(), &scratch, u64::MAX).unwrap();
        let mut file = Windows::from_vecs(items.clone(), &scratch, 16).unwrap();
        assert!(!mem.spilled() && file.spilled());
        for (i, v) in items.iter().enumerate() {
            assert_eq!(&*mem.get(i).unwrap(), v.as_slice());
            assert_eq!(&*file.get(i).unwrap(), v.as_slice());
        }
        file.update(0, |v| {
            v[1] = 9.0;
            Ok(())
        })
        .unwrap();
        assert_eq!(&*file.get(0).unwrap(), &[1.5, 9.0, 3.25]);
        assert_eq!(&*file.get(1).unwrap(), items[1].as_slice(), "its neighbour untouched");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the scratch file is unlinked");
    }
}
