//! Error reporting as runc does it, which is what container engines parse: with `--log FILE`,
//! each error is appended to FILE (`--log-format json`: `{"level":"error","msg":..,"time":..}`
//! per line, as containerd's shim reads it; `text`: logfmt) and the message alone goes to
//! stderr; without `--log`, stderr gets the logfmt line.

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// `time=".." level=error msg=".."`.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

static LOG: OnceLock<(Option<PathBuf>, LogFormat)> = OnceLock::new();

/// Sets where errors go (once, from the global flags).
pub fn init(path: Option<PathBuf>, format: LogFormat) {
    let _ = LOG.set((path, format));
}

fn logfmt(level: &str, msg: &str) -> String {
    format!(
        "time=\"{}\" level={level} msg={}",
        super::state::rfc3339_now(),
        serde_json::to_string(msg).unwrap_or_default()
    )
}

fn json(level: &str, msg: &str) -> String {
    serde_json::json!({"level": level, "msg": msg, "time": super::state::rfc3339_now()}).to_string()
}

/// Reports an error: to the log file and stderr as described above.
pub fn error(msg: &str) {
    let (path, format) = LOG.get().cloned().unwrap_or((None, LogFormat::Text));
    match path {
        Some(p) => {
            let line = match format {
                LogFormat::Text => logfmt("error", msg),
                LogFormat::Json => json("error", msg),
            };
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
            {
                let _ = writeln!(f, "{line}");
            }
            eprintln!("{msg}");
        }
        None => eprintln!("{}", logfmt("error", msg)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lines_have_runc_shape() {
        let t = logfmt("error", "container \"x\" does not exist");
        assert!(t.starts_with("time=\""), "{t}");
        assert!(
            t.ends_with(" level=error msg=\"container \\\"x\\\" does not exist\""),
            "{t}"
        );
        let j: serde_json::Value = serde_json::from_str(&json("error", "boom")).unwrap();
        assert_eq!(j["level"], "error");
        assert_eq!(j["msg"], "boom");
        assert!(j["time"].as_str().unwrap().ends_with('Z'));
    }
}
