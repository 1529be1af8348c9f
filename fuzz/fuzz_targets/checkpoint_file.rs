#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = lorakit_fuzz::exercise::checkpoint_file(data);
});
