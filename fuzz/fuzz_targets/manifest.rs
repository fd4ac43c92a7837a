#![no_main]

use libfuzzer_sys::fuzz_target;

// The manifest parser alone, on the raw bytes (almost always refused by the checksum) and on the
// bytes sealed with their own checksum (so the fuzzer reaches the JSON and the consistency
// checks). Any error is fine; a panic, abort or hang is a bug.
fuzz_target!(|data: &[u8]| {
    candle_fit_fuzz::parse_manifest(data);
});
