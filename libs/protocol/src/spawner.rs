//! The agent spawner's protocol: between the process provider and the `hodei-agent --spawner`
//! it starts, over a Unix socket on one machine (never on NATS).
//!
//! - provider → spawner: a request, a `u32` length (little-endian) then the worker's cgroup
//!   directory, a NUL, and the new agent's environment as `NAME=value` entries, each ended by
//!   a NUL;
//! - spawner → provider: [`Notice`]s of 12 bytes: one `Started` or `Failed` per request, in
//!   the requests' order, and an `Exited` once an agent it started has ended and been reaped.

/// The argument that makes `hodei-agent` a spawner.
pub const FLAG: &str = "--spawner";

/// The file descriptor on which the spawner finds its socket.
pub const SOCKET_FD: i32 = 3;

/// The largest request: a worker's cgroup path and environment (a few KiB in practice).
pub const MAX_REQUEST: usize = 64 * 1024;

/// What the spawner tells the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The request's agent runs, with this pid.
    Started(i32),
    /// The request's agent could not be started: the errno.
    Failed(i32),
    /// An agent the spawner started has ended: its pid and wait status.
    Exited(i32, i32),
}

impl Notice {
    pub const SIZE: usize = 12;

    pub fn encode(self) -> [u8; Self::SIZE] {
        let (kind, a, b): (i32, i32, i32) = match self {
            Notice::Started(pid) => (1, pid, 0),
            Notice::Failed(errno) => (2, errno, 0),
            Notice::Exited(pid, status) => (3, pid, status),
        };
        let mut bytes = [0u8; Self::SIZE];
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[4..8].copy_from_slice(&a.to_le_bytes());
        bytes[8..].copy_from_slice(&b.to_le_bytes());
        bytes
    }

    /// None for a kind this side does not know.
    pub fn decode(bytes: [u8; Self::SIZE]) -> Option<Notice> {
        let word = |i: usize| i32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        match word(0) {
            1 => Some(Notice::Started(word(4))),
            2 => Some(Notice::Failed(word(4))),
            3 => Some(Notice::Exited(word(4), word(8))),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Notice;

    #[test]
    fn notices_decode_as_they_were_encoded() {
        for notice in [
            Notice::Started(4242),
            Notice::Failed(2),
            Notice::Exited(i32::MAX, 0x7f00),
        ] {
            assert_eq!(Notice::decode(notice.encode()), Some(notice));
        }
        assert_eq!(Notice::decode([9; Notice::SIZE]), None);
    }
}
