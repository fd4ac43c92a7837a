#![no_main]

use libfuzzer_sys::fuzz_target;

// The fine-tuning data loaders (JSONL and CSV records, label maps, chat-template spans) on
// arbitrary bytes. Any error is fine; a panic, abort or hang is a bug.
fuzz_target!(|data: &[u8]| {
    candle_fit_fuzz::parse_data(data);
});
