use std::path::PathBuf;

/// Errors from reading, validating and writing tensors. Every variant names the file, and where
/// it applies the tensor, so a user can find the problem without a debugger.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on `path` failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than the 8-byte header length prefix.
    #[error("{}: truncated safetensors file: {len} bytes, the header length alone needs 8", path.display())]
    Truncated {
        /// File.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The header length prefix points past the end of the file.
    #[error("{}: header length {header_len} is larger than the {available} bytes after the prefix (truncated or not a safetensors file)", path.display())]
    HeaderPastEnd {
        /// File.
        path: PathBuf,
        /// Declared header length.
        header_len: u64,
        /// Bytes after the 8-byte prefix.
        available: u64,
    },
    /// The header length exceeds [`crate::MAX_HEADER_SIZE`].
    #[error("{}: header length {header_len} exceeds the {max}-byte limit", path.display())]
    HeaderTooLarge {
        /// File.
        path: PathBuf,
        /// Declared header length.
        header_len: u64,
        /// Limit.
        max: u64,
    },
    /// The header bytes are not UTF-8.
    #[error("{}: header is not valid UTF-8 (byte {valid_up_to})", path.display())]
    HeaderNotUtf8 {
        /// File.
        path: PathBuf,
        /// Offset of the first invalid byte inside the header.
        valid_up_to: usize,
    },
    /// The header is not a JSON object of the expected form.
    #[error("{}: header is not valid safetensors JSON: {source}", path.display())]
    HeaderNotJson {
        /// File.
        path: PathBuf,
        /// Parser error.
        #[source]
        source: serde_json::Error,
    },
    /// Two header entries share a tensor name.
    #[error("{}: duplicate tensor name {name:?} in header", path.display())]
    DuplicateTensor {
        /// File.
        path: PathBuf,
        /// Repeated name.
        name: String,
    },
    /// A header entry names a dtype safetensors does not define.
    #[error("{}: tensor {name:?}: unknown dtype {dtype:?}", path.display())]
    UnknownDtype {
        /// File.
        path: PathBuf,
        /// Tensor.
        name: String,
        /// The dtype as written.
        dtype: String,
    },
    /// shape × dtype size does not match the byte range of a tensor.
    #[error("{}: tensor {name:?}: shape {shape:?} of {dtype} needs {expected} bytes but its data_offsets span {actual}", path.display())]
    ShapeMismatch {
        /// File.
        path: PathBuf,
        /// Tensor.
        name: String,
        /// Dtype.
        dtype: crate::DType,
        /// Declared shape.
        shape: Vec<usize>,
        /// Bytes the shape needs (`None` if it overflows).
        expected: String,
        /// Bytes the offsets span.
        actual: usize,
    },
    /// A tensor's byte range is reversed or extends past the data section.
    #[error("{}: tensor {name:?}: data_offsets [{start}, {end}] out of bounds of the {data_len}-byte data section", path.display())]
    OffsetsOutOfBounds {
        /// File.
        path: PathBuf,
        /// Tensor.
        name: String,
        /// Start offset.
        start: u64,
        /// End offset.
        end: u64,
        /// Data section length.
        data_len: usize,
    },
    /// Two tensors' byte ranges overlap.
    #[error("{}: tensors {first:?} and {second:?} overlap in the data section", path.display())]
    OverlappingTensors {
        /// File.
        path: PathBuf,
        /// Earlier tensor.
        first: String,
        /// Tensor that starts inside it.
        second: String,
    },
    /// Tensors do not cover the data section contiguously.
    #[error("{}: data section not covered by tensors: {detail}", path.display())]
    UncoveredData {
        /// File.
        path: PathBuf,
        /// Where the hole is.
        detail: String,
    },
    /// Something about a model directory or index file is wrong.
    #[error("{}: {reason}", path.display())]
    InvalidModel {
        /// File or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor written does not match its planned layout.
    #[error("{}: tensor {name:?}: {reason}", path.display())]
    WriteMismatch {
        /// Output file.
        path: PathBuf,
        /// Tensor.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
