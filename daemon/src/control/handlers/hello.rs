//! `hello`: the first request of every session; checks the protocol
//! version so a mismatch is said in words, not as a parse error later.

use mftd_common::control::{ErrorCode, Response, PROTOCOL};

pub(super) fn hello(protocol: u32) -> Response {
    if protocol != PROTOCOL {
        return Response::error(
            ErrorCode::VersionMismatch,
            format!("mftd speaks control protocol {PROTOCOL}, mftctl sent {protocol}; use matching versions"),
        );
    }
    Response::Hello {
        protocol: PROTOCOL,
        daemon: format!("mftd {}", env!("CARGO_PKG_VERSION")),
        pid: std::process::id(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_version_is_greeted_another_is_named() {
        match hello(PROTOCOL) {
            Response::Hello { protocol, daemon, pid } => {
                assert_eq!((protocol, pid), (PROTOCOL, std::process::id()));
                assert!(daemon.starts_with("mftd "), "{daemon}");
            }
            other => panic!("{other:?}"),
        }
        match hello(PROTOCOL + 1) {
            Response::Error { code: ErrorCode::VersionMismatch, message } => {
                assert!(message.contains(&format!("protocol {PROTOCOL}, mftctl sent {}", PROTOCOL + 1)), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }
}
