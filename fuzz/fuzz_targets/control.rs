//! Control-socket requests (one JSON line from `mftctl`).
//!
//! Properties: parsing never panics, and a parsed request serializes to JSON
//! that parses back to an equal request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mftd_common::control::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        let json = serde_json::to_vec(&req).expect("a parsed request serializes");
        match serde_json::from_slice::<Request>(&json) {
            Ok(back) => assert_eq!(back, req, "request changed across to_vec/from_slice"),
            Err(e) => panic!("serialized request does not parse: {e}; json {}", String::from_utf8_lossy(&json)),
        }
    }
});
