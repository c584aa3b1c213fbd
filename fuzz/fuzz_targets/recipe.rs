//! Any text as recipe.toml: parsing, every pass config and pass construction return errors, never
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    if let Ok(recipe) = mcompress_recipe::Recipe::parse("fuzz.toml".as_ref(), text) {
        let _ = mcompress_passes::build_passes(&recipe);
    }
});
