//! The request queue and the reader that fills it: requests a peer sent
//! but the writer has not answered yet, and the TRIMs that move the end of
//! a READ queued or being sent.
//!
//! Owns: reading frames off the connection (bounded: [`MAX_QUEUED`]
//! requests, [`MAX_TRIMS`] TRIMs), the idle timeout, and where each TRIM
//! applies. Must never: write to the peer (the writer answers everything,
//! including the reason the reader stopped) or wait for room without
//! noticing that the writer failed.

use std::time::Duration;

use mftd_common::proto::{read_frame, ErrorCode, ErrorFrame, Frame, ProtoError, ReadReq, TRIM_NOT_OPEN};

use super::ConnError;

/// Requests read but not yet answered, and TRIMs not yet applied.
#[derive(Default)]
pub(super) struct RequestQueue {
    state: std::sync::Mutex<QueueState>,
    /// Woken when a request or TRIM arrives, or the reader ends.
    pub(super) arrived: tokio::sync::Notify,
    /// Woken when the writer takes a request (room in the queue).
    pub(super) taken: tokio::sync::Notify,
}

#[derive(Default)]
pub(super) struct QueueState {
    pub(super) requests: std::collections::VecDeque<Request>,
    trims: Vec<(u32, u64)>,
    /// The writer is answering a request.
    pub(super) busy: bool,
    /// The reader ended (peer closed, error) or the writer failed.
    pub(super) closed: bool,
    /// Why the reader stopped, sent to the peer by the writer.
    pub(super) fatal: Option<ErrorFrame>,
}

pub(super) enum Request {
    Stat(String),
    Hashes {
        size: u64,
        mtime_ns: i64,
        path: String,
    },
    /// A READ and, if a TRIM reached it while it waited, its new end.
    Read(ReadReq, Option<u64>),
}

/// Requests a client may have queued beyond the one being answered; more
/// are held back by TCP flow control.
const MAX_QUEUED: usize = 8;

/// TRIMs kept for the writer; older ones are dropped.
const MAX_TRIMS: usize = 64;

impl RequestQueue {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Takes the pending TRIMs (see [`QueueState::take_trims`]).
    pub(super) fn take_trims(&self, current: Option<u32>) -> Vec<(u32, u64)> {
        self.lock().take_trims(current)
    }
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.arrived.notify_one();
        self.taken.notify_one();
    }
}

impl QueueState {
    /// Keeps a TRIM for the writer. Bounded: a client flooding TRIMs keeps
    /// only the latest [`MAX_TRIMS`].
    fn push_trim(&mut self, id: u32, end: u64) {
        if self.trims.len() >= MAX_TRIMS {
            self.trims.remove(0);
        }
        self.trims.push((id, end));
    }

    /// Takes the pending TRIMs. Those for queued READs are applied to them here
    /// (answered with their new end), those for finished ones answered with
    /// [`TRIM_NOT_OPEN`]; those for `current` are left for the caller to apply.
    pub(super) fn take_trims(&mut self, current: Option<u32>) -> Vec<(u32, u64)> {
        let trims = std::mem::take(&mut self.trims);
        let mut out = Vec::with_capacity(trims.len());
        for (tid, tend) in trims {
            if Some(tid) == current {
                out.push((tid, tend));
                continue;
            }
            let queued = self.requests.iter_mut().find_map(|r| match r {
                Request::Read(q, trimmed) if q.id == tid => Some((q, trimmed)),
                _ => None,
            });
            match queued {
                Some((q, trimmed)) => {
                    let end = trimmed.unwrap_or(q.offset.saturating_add(q.len));
                    let new_end = tend.clamp(q.offset, end);
                    *trimmed = Some(new_end);
                    out.push((tid, new_end));
                }
                None => out.push((tid, TRIM_NOT_OPEN)),
            }
        }
        out
    }
}

/// Applies `trims` (taken with [`QueueState::take_trims`] for `id`) to READ
/// `id`, being sent from `pos` and currently ending at `end`: its end moves,
/// never below `pos` nor above `end`. Returns the new end and the TRIMMED
/// answer for each TRIM, in order.
pub(super) fn trim_current(trims: Vec<(u32, u64)>, id: u32, pos: u64, mut end: u64) -> (u64, Vec<(u32, u64)>) {
    let mut answers = Vec::with_capacity(trims.len());
    for (tid, tend) in trims {
        let answer = if tid == id {
            end = tend.clamp(pos, end);
            end
        } else {
            tend
        };
        answers.push((tid, answer));
    }
    (end, answers)
}

pub(super) async fn read_loop(
    mut rd: crate::transport::ReadHalf<'_>,
    idle: Duration,
    queue: &RequestQueue,
) -> Result<(), ConnError> {
    loop {
        // Room for one more request (bounded memory per connection).
        loop {
            let taken = queue.taken.notified();
            {
                let st = queue.lock();
                if st.closed {
                    return Ok(());
                }
                if st.requests.len() < MAX_QUEUED {
                    break;
                }
            }
            taken.await;
        }
        // The idle timeout applies only while nothing is being answered: a
        // client streaming a large READ has nothing to say for a long time.
        // The same read future is kept across checks (read_frame is not
        // cancel-safe).
        let read = read_frame(&mut rd);
        tokio::pin!(read);
        let frame = loop {
            tokio::select! {
                f = &mut read => break f,
                _ = tokio::time::sleep(idle) => {
                    let st = queue.lock();
                    if st.closed {
                        return Ok(());
                    }
                    if !st.busy && st.requests.is_empty() {
                        return Err(ConnError::Timeout);
                    }
                }
            }
        };
        let frame = match frame {
            Err(ProtoError::Closed) => return Ok(()),
            Err(e @ (ProtoError::Malformed { .. } | ProtoError::UnknownType(_) | ProtoError::TooLarge { .. })) => {
                queue.lock().fatal = Some(ErrorFrame { id: 0, code: ErrorCode::BadFrame, message: e.to_string() });
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
            Ok(f) => f,
        };
        let mut st = queue.lock();
        match frame {
            Frame::Stat { path } => st.requests.push_back(Request::Stat(path)),
            Frame::Read(req) => st.requests.push_back(Request::Read(req, None)),
            Frame::Hashes { size, mtime_ns, path } => st.requests.push_back(Request::Hashes { size, mtime_ns, path }),
            Frame::Trim { id, end } => st.push_trim(id, end),
            other => {
                let name = other.name();
                st.fatal = Some(ErrorFrame {
                    id: 0,
                    code: ErrorCode::BadFrame,
                    message: format!("unexpected {name} frame from client"),
                });
                drop(st);
                return Err(ConnError::Closed("unexpected frame".into()));
            }
        }
        drop(st);
        queue.arrived.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(id: u32, offset: u64, len: u64) -> Request {
        Request::Read(ReadReq { id, path: "f".into(), size: 1 << 20, mtime_ns: 1, offset, len }, None)
    }

    fn queued_end(st: &QueueState, id: u32) -> Option<Option<u64>> {
        st.requests.iter().find_map(|r| match r {
            Request::Read(q, trimmed) if q.id == id => Some(*trimmed),
            _ => None,
        })
    }

    #[test]
    fn a_trim_moves_the_end_of_a_queued_read_never_below_its_start_nor_above_its_end() {
        let mut st = QueueState::default();
        st.requests.extend([read(1, 100, 100), read(2, 1000, 500), read(3, 0, 10)]);
        st.push_trim(1, 150);
        st.push_trim(2, 10);
        st.push_trim(3, 99);
        assert_eq!(st.take_trims(None), [(1, 150), (2, 1000), (3, 10)]);
        assert_eq!(queued_end(&st, 1), Some(Some(150)));
        assert_eq!(queued_end(&st, 2), Some(Some(1000)), "trimmed to its start: it sends nothing");
        assert_eq!(queued_end(&st, 3), Some(Some(10)), "a TRIM past the end changes nothing");
        // A second TRIM cannot give back what the first took.
        st.push_trim(1, 190);
        assert_eq!(st.take_trims(None), [(1, 150)]);
        st.push_trim(1, 120);
        assert_eq!(st.take_trims(None), [(1, 120)]);
        assert!(st.take_trims(None).is_empty(), "each TRIM is answered once");
    }

    #[test]
    fn a_trim_for_no_queued_read_is_answered_not_open_and_one_for_the_current_is_left() {
        let mut st = QueueState::default();
        st.requests.push_back(read(5, 0, 100));
        st.push_trim(4, 50);
        st.push_trim(6, 50);
        st.push_trim(5, 40);
        assert_eq!(st.take_trims(Some(6)), [(4, TRIM_NOT_OPEN), (6, 50), (5, 40)]);
        assert_eq!(queued_end(&st, 5), Some(Some(40)));
    }

    #[test]
    fn the_current_read_is_trimmed_between_where_it_is_and_where_it_ends() {
        // Sending 100..200, now at 130.
        assert_eq!(trim_current(vec![(7, 160)], 7, 130, 200), (160, vec![(7, 160)]));
        assert_eq!(trim_current(vec![(7, 110)], 7, 130, 200), (130, vec![(7, 130)]), "not below what was sent");
        assert_eq!(trim_current(vec![(7, 900)], 7, 130, 200), (200, vec![(7, 200)]), "never longer");
        // Others' answers pass through in order; the last TRIM of `id` wins
        // only where it shortens.
        let (end, answers) = trim_current(vec![(7, 180), (8, 5), (7, 190)], 7, 130, 200);
        assert_eq!(end, 180);
        assert_eq!(answers, [(7, 180), (8, 5), (7, 180)]);
    }

    #[test]
    fn a_flood_of_trims_keeps_only_the_latest() {
        let mut st = QueueState::default();
        for i in 0..1000u32 {
            st.push_trim(i, 0);
        }
        let trims = st.take_trims(None);
        assert_eq!(trims.len(), MAX_TRIMS);
        assert_eq!(trims.first().map(|t| t.0), Some(1000 - MAX_TRIMS as u32));
    }
}
