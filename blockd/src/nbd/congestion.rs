//! The TCP congestion control of NBD connections from this host: an algorithm without pacing
//! instead of the system's default, which may be a paced one (BBR) that only costs on loopback.
//!
//! A connection from the same host never leaves the machine: there is no link to share and no
//! queue to keep short, so congestion control has nothing to do. BBR (a common system default)
//! still paces every segment with timers. On the reference VM, with BBR as the default, 1 MiB
//! reads over loopback at queue depth 8 went from 2,513 to 4,625 MiB/s when the server's socket
//! used cubic instead, and the server's CPU per read fell from 362 to 206 µs
//! (docs/benchmarks-nbd.md, session 14). Connections from other hosts keep the system default.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// The congestion control algorithm same-host connections use unless told otherwise: the
/// kernel's own default, built into every Linux kernel, and not paced.
pub const DEFAULT_SAME_HOST: &str = "cubic";

/// Longest algorithm name the kernel takes (`TCP_CA_NAME_MAX` less the NUL).
const NAME_MAX: usize = 15;

/// A TCP congestion control algorithm's name (`cubic`, `reno`, `bbr`, ...), as `TCP_CONGESTION`
/// takes it; `Copy`, so that it fits in [`super::server::ServerOptions`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Algorithm {
    name: [u8; NAME_MAX],
    len: u8,
}

impl Algorithm {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.name[..usize::from(self.len)]).expect("checked at parse")
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Algorithm({})", self.as_str())
    }
}

/// Why a name is not an algorithm name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a TCP congestion control algorithm name (1 to 15 letters, digits, '_' or '-')"
)]
pub struct BadAlgorithm(pub String);

impl FromStr for Algorithm {
    type Err = BadAlgorithm;

    fn from_str(text: &str) -> Result<Algorithm, BadAlgorithm> {
        let ok = !text.is_empty()
            && text.len() <= NAME_MAX
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(BadAlgorithm(text.to_string()));
        }
        let mut name = [0u8; NAME_MAX];
        name[..text.len()].copy_from_slice(text.as_bytes());
        Ok(Algorithm {
            name,
            len: text.len() as u8,
        })
    }
}

/// What same-host connections use: an algorithm, or whatever the system's default is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameHost {
    /// Keep the system's default (`net.ipv4.tcp_congestion_control`).
    System,
    Use(Algorithm),
}

impl Default for SameHost {
    fn default() -> Self {
        SameHost::Use(DEFAULT_SAME_HOST.parse().expect("a valid name"))
    }
}

impl FromStr for SameHost {
    type Err = BadAlgorithm;

    /// `system`, or an algorithm's name.
    fn from_str(text: &str) -> Result<SameHost, BadAlgorithm> {
        if text == "system" {
            Ok(SameHost::System)
        } else {
            text.parse().map(SameHost::Use)
        }
    }
}

impl fmt::Display for SameHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SameHost::System => f.write_str("system"),
            SameHost::Use(a) => a.fmt(f),
        }
    }
}

/// Whether a TCP connection between `local` and `peer` stays on this host: the peer is a
/// loopback address, or this host's own address (a connection to an address of one's own
/// goes over loopback too, with the same address at both ends).
pub fn is_same_host(local: SocketAddr, peer: SocketAddr) -> bool {
    let canonical = |ip: IpAddr| ip.to_canonical();
    let peer_ip = canonical(peer.ip());
    peer_ip.is_loopback() || peer_ip == canonical(local.ip())
}

/// The algorithm an accepted connection between `local` and `peer` should be switched to, if
/// any.
pub fn choice_for(setting: SameHost, local: SocketAddr, peer: SocketAddr) -> Option<Algorithm> {
    match setting {
        SameHost::Use(a) if is_same_host(local, peer) => Some(a),
        _ => None,
    }
}

/// Switches `socket` to `algorithm`. Best effort for the caller: an algorithm the kernel lacks
/// (`ENOENT`) or may not give this process (`EPERM`) leaves the socket as it was.
pub fn apply(socket: &tokio::net::TcpStream, algorithm: Algorithm) -> std::io::Result<()> {
    socket2::SockRef::from(socket).set_tcp_congestion(algorithm.as_str().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn names_are_checked() {
        assert_eq!("cubic".parse::<Algorithm>().unwrap().as_str(), "cubic");
        assert_eq!(
            "bbr2-x_1".parse::<Algorithm>().unwrap().to_string(),
            "bbr2-x_1"
        );
        for bad in [
            "",
            "a b",
            "cubic\0",
            "sixteen-letters!",
            "0123456789abcdef",
            "é",
        ] {
            assert_eq!(
                bad.parse::<Algorithm>(),
                Err(BadAlgorithm(bad.to_string())),
                "{bad:?}"
            );
        }
        assert_eq!("system".parse::<SameHost>().unwrap(), SameHost::System);
        assert_eq!(
            "reno".parse::<SameHost>().unwrap(),
            SameHost::Use("reno".parse().unwrap())
        );
        assert_eq!(SameHost::default().to_string(), "cubic");
    }

    #[test]
    fn same_host_is_loopback_or_the_same_address() {
        let cases = [
            ("127.0.0.1:10809", "127.0.0.1:40000", true),
            ("127.0.0.1:10809", "127.0.0.2:40000", true),
            ("[::1]:10809", "[::1]:40000", true),
            ("[::ffff:127.0.0.1]:10809", "[::ffff:127.0.0.1]:40000", true),
            ("10.0.0.5:10809", "10.0.0.5:40000", true),
            ("[::ffff:10.0.0.5]:10809", "10.0.0.5:40000", true),
            ("10.0.0.5:10809", "10.0.0.6:40000", false),
            ("[fd00::5]:10809", "[fd00::6]:40000", false),
        ];
        for (local, peer, same) in cases {
            assert_eq!(
                is_same_host(addr(local), addr(peer)),
                same,
                "{local} <- {peer}"
            );
        }
    }

    #[test]
    fn only_same_host_connections_are_switched_and_system_switches_none() {
        let (local, near, far) = (
            addr("10.0.0.5:10809"),
            addr("127.0.0.1:1"),
            addr("10.0.0.9:1"),
        );
        let cubic: Algorithm = "cubic".parse().unwrap();
        assert_eq!(choice_for(SameHost::Use(cubic), local, near), Some(cubic));
        assert_eq!(choice_for(SameHost::Use(cubic), local, far), None);
        assert_eq!(choice_for(SameHost::System, local, near), None);
    }

    #[tokio::test]
    async fn a_socket_is_switched_and_an_unknown_algorithm_is_an_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let reno: Algorithm = "reno".parse().unwrap();
        apply(&client, reno).unwrap();
        let now = socket2::SockRef::from(&client).tcp_congestion().unwrap();
        assert_eq!(now.split(|&b| b == 0).next().unwrap(), b"reno");
        let missing: Algorithm = "no-such-cc".parse().unwrap();
        assert!(apply(&client, missing).is_err());
    }
}
