//! systemd's readiness protocol (`sd_notify(3)`), the few lines of it thinpoold needs: one
//! datagram of `KEY=VALUE` lines to the unix socket named by `$NOTIFY_SOCKET`. A path, or an
//! abstract address written with a leading `@`. Without `$NOTIFY_SOCKET` (not started by
//! systemd with `Type=notify`) every call is a no-op.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (e.g. `"READY=1"`, `"STOPPING=1"`) to `$NOTIFY_SOCKET`. Returns whether
/// a message was sent: `Ok(false)` when the variable is unset or empty.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(v) if !v.is_empty() => {
            let v = v.into_string().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "NOTIFY_SOCKET is not UTF-8")
            })?;
            notify_to(&v, state)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Sends `state` to the notify socket `address` (a path, or `@name` for an abstract one).
pub fn notify_to(address: &str, state: &str) -> io::Result<()> {
    let addr = parse_address(address)?;
    let sock = UnixDatagram::unbound()?;
    let n = sock.send_to_addr(state.as_bytes(), &addr)?;
    if n != state.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short notify datagram",
        ));
    }
    Ok(())
}

fn parse_address(address: &str) -> io::Result<SocketAddr> {
    if let Some(name) = address.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if address.starts_with('/') {
        SocketAddr::from_pathname(address)
    } else {
        // systemd only ever hands out absolute paths or abstract names; anything else is a
        // misconfiguration we should not guess at (a relative path would depend on our cwd).
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET {address:?} is neither an absolute path nor @abstract"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory of this test's own (no tempfile dependency for three tests).
    fn scratch(test: &str) -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("thinpool-sdnotify-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn path_socket_gets_the_state() {
        let dir = scratch("path");
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1").unwrap();
        assert_eq!(recv(&sock), "READY=1");
        notify_to(path.to_str().unwrap(), "STOPPING=1\nSTATUS=bye").unwrap();
        assert_eq!(recv(&sock), "STOPPING=1\nSTATUS=bye");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn abstract_socket_gets_the_state() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("thinpool-sdnotify-test-{}", std::process::id());
        let sock =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        notify_to(&format!("@{name}"), "READY=1").unwrap();
        assert_eq!(recv(&sock), "READY=1");
    }

    #[test]
    fn bad_addresses_are_errors() {
        assert!(notify_to("relative/path", "READY=1").is_err());
        // Nobody bound there: the send fails (ENOENT), it does not hang or panic.
        let dir = scratch("none");
        assert!(notify_to(dir.join("none").to_str().unwrap(), "READY=1").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
