//! Finding the executable as runc does (Go's `exec.LookPath`), with its
//! error texts.

use std::os::unix::fs::PermissionsExt;

use agent_protocol::ErrorKind;

/// `PATH` used when the process environment has none (runc's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Finds `name` the way runc (Go's `exec.LookPath`) does and returns the path
/// to exec, or the runc-style error.
pub fn look_path(name: &str, path_env: &str) -> Result<String, (ErrorKind, String)> {
    if name.contains('/') {
        return match std::fs::metadata(name) {
            Ok(_) => Ok(name.to_owned()),
            Err(e) => Err((
                ErrorKind::ExecNotFound,
                format!("exec: {name:?}: stat {name}: {}", io_reason(&e)),
            )),
        };
    }
    for dir in path_env.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = format!("{dir}/{name}");
        if let Ok(meta) = std::fs::metadata(&candidate)
            && meta.is_file()
            && meta.permissions().mode() & 0o111 != 0
        {
            return Ok(candidate);
        }
    }
    Err((
        ErrorKind::ExecNotFound,
        format!("exec: {name:?}: executable file not found in $PATH"),
    ))
}

/// Go-style lower-case reason ("no such file or directory").
fn io_reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::Error::from_raw(n).desc().to_lowercase(),
        None => e.to_string(),
    }
}

pub(crate) fn errno_reason(e: nix::Error) -> String {
    e.desc().to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_look_path_missing_command_runc_message() {
        let err = look_path("definitely-not-a-command", "/nonexistent-dir").unwrap_err();
        assert_eq!(err.0, ErrorKind::ExecNotFound);
        assert_eq!(
            err.1,
            "exec: \"definitely-not-a-command\": executable file not found in $PATH"
        );
    }

    #[test]
    fn test_look_path_missing_absolute_path_stat_message() {
        let err = look_path("/nonexistent/x", DEFAULT_PATH).unwrap_err();
        assert_eq!(
            err.1,
            "exec: \"/nonexistent/x\": stat /nonexistent/x: no such file or directory"
        );
    }

    #[test]
    fn test_look_path_finds_executable_in_path() {
        assert_eq!(look_path("sh", "/nonexistent:/bin").unwrap(), "/bin/sh");
    }

    #[test]
    fn test_look_path_non_executable_file_skipped() {
        // /etc/passwd exists but is not executable.
        assert!(look_path("passwd", "/etc").is_err());
    }
}
