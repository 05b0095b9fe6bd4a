//! Binding the admin socket.

use std::{io, os::unix::fs::PermissionsExt, path::Path};

use tokio::net::UnixListener;

pub async fn bind(path: &Path, group: &str) -> io::Result<UnixListener> {
    let gid = if group.is_empty() {
        None
    } else {
        Some(crate::sys::group_gid(group).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("[admin] group {group:?} does not exist"),
            )
        })?)
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use by a running allowlistd; stop it first or set [admin] socket",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Bind inside a fresh private folder (0700), set the socket's mode, then
    // rename it into place: nobody else can reach it before it is 0600, and
    // the process-wide umask (which the edge workers, already running,
    // also create files under) is never touched.
    use std::os::unix::fs::DirBuilderExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let private = dir.join(format!(".allowlist-admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("admin.sock");
    let bound = (|| {
        let listener = UnixListener::bind(&staged)?;
        // 0600, or 0660 owned by the operators' group.
        let mode = match gid {
            Some(gid) => {
                std::os::unix::fs::chown(&staged, None, Some(gid))?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staged, path)?;
        Ok::<_, io::Error>(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    let listener = bound?;
    Ok(listener)
}
