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

/// The log file (opened once: a jailed supervisor cannot open it again), its path, the format.
type LogTarget = (Option<(PathBuf, Option<std::fs::File>)>, LogFormat);

static LOG: OnceLock<LogTarget> = OnceLock::new();

/// Sets where errors go (once, from the global flags).
pub fn init(path: Option<PathBuf>, format: LogFormat) {
    let target = path.map(|p| {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .ok();
        (p, f)
    });
    let _ = LOG.set((target, format));
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
    let (target, format) = match LOG.get() {
        Some((t, f)) => (t.as_ref(), *f),
        None => (None, LogFormat::Text),
    };
    match target {
        Some((p, f)) => {
            let line = match format {
                LogFormat::Text => logfmt("error", msg),
                LogFormat::Json => json("error", msg),
            };
            match f {
                Some(f) => {
                    let mut f: &std::fs::File = f;
                    let _ = writeln!(f, "{line}");
                }
                None => {
                    if let Ok(mut f) = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                    {
                        let _ = writeln!(f, "{line}");
                    }
                }
            }
            eprintln!("{msg}");
        }
        None => eprintln!("{}", logfmt("error", msg)),
    }
}

/// The VMM's and the runtime's own log lines (`--debug`), in runc's logrus shape: `time=".."
/// level=debug msg=".."` (text) or one JSON object per line, so whatever parses runc's log parses
/// ours.
#[derive(Debug, Clone, Copy)]
pub struct RuncFormat(pub LogFormat);

/// Gathers an event's message and fields into one line.
struct Message(String);

impl tracing::field::Visit for Message {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else {
            self.0.push_str(&format!(" {}={value}", field.name()));
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for RuncFormat
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut msg = Message(String::new());
        event.record(&mut msg);
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warning",
            tracing::Level::INFO => "info",
            tracing::Level::DEBUG => "debug",
            tracing::Level::TRACE => "trace",
        };
        let line = match self.0 {
            LogFormat::Text => logfmt(level, msg.0.trim()),
            LogFormat::Json => json(level, msg.0.trim()),
        };
        writeln!(writer, "{line}")
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

    #[test]
    fn test_tracing_events_become_logrus_lines() {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .event_format(RuncFormat(LogFormat::Text))
            .with_writer(move || SinkWriter(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(pid = 7, "process started");
            tracing::warn!("careful");
        });
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("time=\""), "{text}");
        assert!(
            lines[0].ends_with(" level=debug msg=\"process started pid=7\""),
            "{text}"
        );
        assert!(
            lines[1].ends_with(" level=warning msg=\"careful\""),
            "{text}"
        );
    }

    struct SinkWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for SinkWriter {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
