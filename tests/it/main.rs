//! Integration tests: the `mcompress` binary run as a user runs it.

mod bad_input;
mod bundle;
mod minilm;
mod util;
