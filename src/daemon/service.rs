//! Devices run by systemd: `ublk-cow serve CONFIG`, what the template unit
//! `ublk-cow@NAME.service` runs with `/etc/ublk-cow/NAME.conf`. Owns the
//! configuration file's format, the choice between adding the device and
//! recovering it, and the readiness message to systemd (`READY=1` on
//! `$NOTIFY_SOCKET`, the `sd_notify` protocol: one datagram).
//!
//! A configuration names the base and the overlay, and any other option of
//! `add` by its long name, one `key = value` a line; `#` starts a comment.
//! The device serves in the foreground. When the overlay's device exists
//! already and its daemon is gone (the unit restarting after a crash), it is
//! recovered: the same /dev/ublkbN, no write lost. A stop (SIGTERM) is
//! `del`: flush, mark the overlay clean, remove the device.

use super::{AddRequest, DeviceState, state};
use anyhow::{Context, Result, bail};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

/// The command line of `add --foreground` that the configuration at `path`
/// describes. `flags` are the long names of add's options that take no
/// value (given as `yes`/`no`, `true`/`false` or `1`/`0` in the file).
pub(crate) fn add_argv(path: &Path, flags: &[String]) -> Result<Vec<String>> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {shown}"))?;
    let mut argv = vec!["ublk-cow".to_string(), "add".into(), "--foreground".into()];
    let mut seen: Vec<String> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let n = i + 1;
        let Some((key, value)) = line.split_once('=') else {
            bail!("{shown} line {n}: not `key = value`: {line}");
        };
        let (key, value) = (key.trim(), value.trim());
        if key == "foreground" || key.starts_with('-') || key.is_empty() {
            bail!("{shown} line {n}: {key:?} is not an option here");
        }
        if seen.iter().any(|k| k == key) {
            bail!("{shown} line {n}: {key} is given twice");
        }
        seen.push(key.to_string());
        if flags.iter().any(|f| f == key) {
            match value {
                "yes" | "true" | "1" => argv.push(format!("--{key}")),
                "no" | "false" | "0" => {}
                _ => bail!("{shown} line {n}: {key} takes yes or no, not {value:?}"),
            }
        } else {
            if value.is_empty() {
                bail!("{shown} line {n}: {key} has no value");
            }
            argv.push(format!("--{key}"));
            argv.push(value.to_string());
        }
    }
    for required in ["base", "overlay"] {
        if !seen.iter().any(|k| k == required) {
            bail!("{shown}: no {required} (a device run by systemd keeps its overlay)");
        }
    }
    Ok(argv)
}

/// `ublk-cow serve CONFIG`, after the configuration became `req`: recovers
/// the device that serves `req`'s overlay if its daemon is gone, else adds
/// it; in the foreground either way.
pub(crate) fn serve(req: AddRequest) -> Result<()> {
    let overlay = req
        .overlay
        .as_deref()
        .context("a configuration names its overlay")?;
    let overlay =
        std::path::absolute(overlay).with_context(|| format!("overlay {}", overlay.display()))?;
    let ours = |st: &DeviceState| {
        st.overlay == overlay
            || std::fs::canonicalize(&st.overlay).ok() == std::fs::canonicalize(&overlay).ok()
    };
    if let Some(st) = state::all()?.into_iter().find(ours) {
        if st.daemon_alive() {
            bail!(
                "overlay {} is served already by device {} (daemon pid {})",
                overlay.display(),
                st.id,
                st.pid
            );
        }
        if st.this_boot() && crate::ublk::device_exists(st.id) {
            log::info!(
                "device {} over overlay {} lost its daemon: recovering it",
                st.id,
                overlay.display()
            );
            return super::recover(st.id, true);
        }
        // The device is gone but its live map is not: closing the overlay
        // from it first, as `del` does, keeps every write it holds.
        log::info!(
            "device {} is gone; writing its live map into overlay {} before adding it again",
            st.id,
            overlay.display()
        );
        super::del(st.id)?;
    }
    super::add(req)
}

/// Tells systemd `msg` (`READY=1`, ...) when it started this process with
/// `$NOTIFY_SOCKET`; nothing otherwise.
pub(crate) fn notify(msg: &str) {
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET")
        && let Err(e) = notify_to(&path, msg)
    {
        log::warn!("telling systemd {msg:?}: {}", crate::cli::error_line(&e));
    }
}

/// Sends `msg` as one datagram to the socket `path`: a file, or, starting
/// with `@`, a name in the abstract namespace.
fn notify_to(path: &OsStr, msg: &str) -> Result<()> {
    let sock = UnixDatagram::unbound().context("creating a datagram socket")?;
    let bytes = path.as_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name).context("NOTIFY_SOCKET")?;
        sock.send_to_addr(msg.as_bytes(), &addr)
    } else {
        sock.send_to(msg.as_bytes(), path)
    };
    sent.with_context(|| format!("sending to {}", path.to_string_lossy()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ublk-cow-svc-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn readiness_reaches_a_socket_file_and_an_abstract_one() {
        let d = scratch("notify");
        let path = d.join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        use std::os::linux::net::SocketAddrExt;
        let name = format!("ublk-cow-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abs = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(OsStr::from_bytes(format!("@{name}").as_bytes()), "READY=1").unwrap();
        let n = abs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_configuration_becomes_add_options() {
        let d = scratch("conf");
        let conf = d.join("vm.conf");
        std::fs::write(
            &conf,
            "# a device\nbase = /srv/base.img\noverlay = /var/lib/x.overlay  # kept\n\n\
             number = 3\nread-only = yes\ncow-on-read = no\nblock-size = 64K\n",
        )
        .unwrap();
        let flags = ["read-only".to_string(), "cow-on-read".into()];
        let argv = add_argv(&conf, &flags).unwrap();
        assert_eq!(
            argv.join(" "),
            "ublk-cow add --foreground --base /srv/base.img --overlay /var/lib/x.overlay \
             --number 3 --read-only --block-size 64K"
        );
        for (text, want) in [
            ("base = /b\n", "no overlay"),
            ("overlay = /o\n", "no base"),
            ("base = /b\noverlay = /o\nbase = /c\n", "given twice"),
            ("base = /b\noverlay = /o\nread-only = maybe\n", "yes or no"),
            (
                "base = /b\noverlay = /o\nforeground = yes\n",
                "not an option",
            ),
            ("base /b\n", "not `key = value`"),
        ] {
            std::fs::write(&conf, text).unwrap();
            let e = add_argv(&conf, &flags).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
