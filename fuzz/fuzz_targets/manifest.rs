//! Download manifests (`<state_dir>/manifests/<ID>.json`).
//!
//! Properties: `Manifest::decode` never panics, and a manifest it accepts
//! re-encodes to one it accepts again, equal in every field but `checksum`.
//!
//! Random bytes almost never carry a valid BLAKE3 checksum, so on its own the
//! fuzzer would stop at the checksum test. A second stage therefore parses the
//! input as a `Manifest` without any check and re-encodes it with
//! `Manifest::encode` (fresh checksum under the fuzzer's key), which lets the fuzzer reach the
//! format/version/consistency checks and the round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mftd_common::manifest::{Key, Manifest};

const KEY: Key = [0x5a; 32];

fn check_decode(bytes: &[u8]) {
    let Ok(m) = Manifest::decode(bytes, &KEY) else { return };
    let again = m.encode(&KEY);
    match Manifest::decode(&again, &KEY) {
        Ok(mut back) => {
            let mut orig = m;
            orig.checksum.clear();
            back.checksum.clear();
            assert_eq!(back, orig, "manifest changed across encode/decode");
        }
        Err(e) => panic!("re-encoded manifest is refused: {e}; {}", String::from_utf8_lossy(&again)),
    }
}

fuzz_target!(|data: &[u8]| {
    check_decode(data);
    if let Ok(m) = serde_json::from_slice::<Manifest>(data) {
        check_decode(&m.encode(&KEY));
    }
});
