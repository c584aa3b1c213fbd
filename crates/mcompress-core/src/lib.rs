//! Tensor I/O for mcompress.
//!
//! # Overview
//! - [`DType`]: every dtype the safetensors format defines, with bit widths and f32 conversion.
//! - [`SafetensorsFile`]: a memory-mapped, fully validated safetensors file. Every header problem
//!   (truncation, bad offsets, duplicate names, unknown dtypes, shape/length mismatch) is its own
//!   [`Error`] variant naming the file and tensor; untrusted bytes never panic.
//! - [`SafetensorsWriter`]: a deterministic streaming writer. The header is computed first from the
//!   planned tensors (sorted by alignment, then name) and each tensor is written at its offset as it
//!   is produced, so peak memory stays at the size of the tensors in flight.
//! - [`ModelSource`]: a Hugging Face style model directory (config, single or sharded safetensors,
//!   tokenizer files) or a lone `.safetensors` file.
//! - [`gguf`]: GGUF reading and writing; [`ggml`]: ggml's reference block quantizers.
//! - [`fsutil`]: sha256 of files, atomic small-file writes.
//!
//! # Example
//! ```no_run
//! use mcompress_core::ModelSource;
//! let model = ModelSource::open("fixtures/digits-mlp".as_ref())?;
//! for t in model.tensors() {
//!     let view = model.view(t);
//!     println!("{} {:?} {:?}", view.name, view.dtype, view.shape);
//! }
//! # Ok::<(), mcompress_core::Error>(())
//! ```
#![deny(missing_docs)]

pub mod arch;
pub mod config;
mod dtype;
mod error;
pub mod fsutil;
pub mod ggml;
pub mod gguf;
mod model;
mod safetensors;
mod writer;

pub use dtype::DType;
pub use error::{Error, Result};
pub use model::{AUX_FILES, ModelSource, TensorRef};
pub use safetensors::{MAX_HEADER_SIZE, SafetensorsFile, TensorInfo, TensorView};
pub use writer::{SafetensorsLayout, SafetensorsWriter, TensorEntry};
