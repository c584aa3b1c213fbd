//! Integration tests: the `mcompress` binary run as a user runs it.
#![allow(clippy::print_stderr)]

mod bad_input;
mod bundle;
mod compare;
mod crash;
mod distill;
mod families;
mod gguf;
mod gguf_export;
mod hostile;
mod html;
mod minilm;
mod prune;
mod runtimes;
mod sign;
mod structured;
mod util;
#[cfg(feature = "wgpu")]
mod wgpu;
