//! Any bytes: the xclbin parser returns a value or an error, never panics, and a parsed file's
//! sections, compute units and PDIs are consistent with it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    unicorn_xdna::xclbin::check_invariants(data);
});
