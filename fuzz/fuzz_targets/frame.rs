//! Transfer-protocol frames.
//!
//! Two views of the same input:
//! * `Frame::decode(data[0], &data[1..])`: the body decoder on its own;
//! * `read_frame` over the whole input as a byte stream, frame after frame
//!   until the first error (what a server or client does with a socket).
//!
//! Properties: neither panics, and every frame they accept survives
//! `encode` -> `decode` unchanged (with a length header that matches the body).
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use mftd_common::proto::{read_frame, Frame, HEADER_LEN};

static RT: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().build().expect("current-thread runtime"));

fn assert_roundtrip(frame: &Frame) {
    let bytes = frame.encode();
    assert!(bytes.len() >= HEADER_LEN, "encoding shorter than a header: {bytes:02x?}");
    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    assert_eq!(len, bytes.len() - HEADER_LEN, "length header does not match body for {frame:?}");
    match Frame::decode(bytes[0], &bytes[HEADER_LEN..]) {
        Ok(back) => assert_eq!(&back, frame, "frame changed across encode/decode"),
        Err(e) => panic!("encoding of a decoded frame does not decode: {e}; frame {frame:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some((&kind, body)) = data.split_first() {
        if let Ok(frame) = Frame::decode(kind, body) {
            assert_eq!(frame.encode()[0], kind, "frame type changed across decode/encode");
            assert_roundtrip(&frame);
        }
    }

    RT.block_on(async {
        let mut stream = data;
        // Every successful read consumes at least a header, so this ends.
        while let Ok(frame) = read_frame(&mut stream).await {
            assert_roundtrip(&frame);
        }
    });
});
