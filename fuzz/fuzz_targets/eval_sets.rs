//! Any bytes as an eval set: a labelled CSV (features and label count from the first two bytes),
//! a perplexity text and a sentence list. Errors, never a panic; memory bounded by the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (features, labels, rest) = match data {
        [f, l, rest @ ..] => (usize::from(*f % 70), usize::from(*l % 12), rest),
        _ => return,
    };
    let _ = mcompress_eval::sets::LabelledSet::read_csv("fuzz.csv", rest, features, labels);
    let _ = mcompress_eval::sets::text_from_bytes("fuzz.txt", rest.to_vec());
    let _ = mcompress_eval::sets::lines_from_bytes("fuzz.txt", rest.to_vec());
});
