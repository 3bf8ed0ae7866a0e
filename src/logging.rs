//! Text-log field formatting that cannot be forged: every control character in a message or a
//! field value (newline, carriage return, ESC, Unicode line separators and bidi overrides)
//! is written escaped, so a registry string can neither start a new log line nor drive a
//! terminal. Plain string values print bare (`upstream=kotaemon`), the same whether a call
//! site passed a `&str` or a `Display` value; values with spaces or quotes print quoted.
//!
//! JSON logs escape by construction and do not use this.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;

/// The `fmt_fields` of the text log: tracing's default layout, with escaped values.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'a> MakeVisitor<Writer<'a>> for EscapedFields {
    type Visitor = EscapingVisitor<'a>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        EscapingVisitor {
            writer: target,
            empty: true,
            result: Ok(()),
        }
    }
}

/// Writes `name=value` pairs (and the bare message) with every control character escaped.
#[derive(Debug)]
pub struct EscapingVisitor<'a> {
    writer: Writer<'a>,
    empty: bool,
    result: fmt::Result,
}

/// Whether `c` could break a log line or reach a terminal as a command.
fn is_dangerous(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every dangerous character written as a Rust escape (`\n`, `\u{1b}`).
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(is_dangerous) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_dangerous(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// A string that can be printed bare in `key=value` form without ambiguity.
fn is_bare(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| !c.is_whitespace() && !is_dangerous(c) && !matches!(c, '"' | '=' | '\\'))
}

impl EscapingVisitor<'_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let pad = if self.empty { "" } else { " " };
        self.empty = false;
        self.result = match field.name() {
            "message" => write!(self.writer, "{pad}{}", escape(value)),
            name => write!(
                self.writer,
                "{pad}{}={}",
                name.trim_start_matches("r#"),
                escape(value)
            ),
        };
    }
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" || is_bare(value) {
            self.write(field, value);
        } else {
            // Debug quoting escapes quotes, backslashes and control characters.
            self.write(field, &format!("{value:?}"));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // Error chains often repeat the inner message; each distinct cause is printed once.
        self.write(field, &crate::sources::retry::error_chain(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

impl VisitOutput<fmt::Result> for EscapingVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for EscapingVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The text log of whatever `emit` logs, through the daemon's text formatter.
    fn text_log(emit: impl FnOnce()) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .fmt_fields(EscapedFields)
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    const FORGED: &str =
        "web-1\n2026-01-01T00:00:00Z  INFO upstreamd: Applied the new upstream file\x1b[2K";

    #[test]
    fn a_registry_value_with_newline_and_escape_stays_on_one_escaped_line() {
        let log = text_log(|| {
            tracing::warn!(service_id = %FORGED, node = FORGED, why = ?FORGED, "Skipped an entry.");
        });
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(!log.contains('\x1b'), "{log}");
        assert!(log.contains(r"service_id=web-1\n2026"), "{log}");
        assert!(log.contains(r#"node="web-1\n2026"#), "{log}");
        assert!(log.contains(r"\u{1b}[2K"), "{log}");
    }

    #[test]
    fn an_error_with_a_multi_line_message_stays_on_one_line() {
        let error = std::io::Error::other("nginx: [emerg] bad\nnginx: configuration test failed");
        let log = text_log(|| tracing::error!(error = &error as &dyn std::error::Error, "Failed."));
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(log.contains(r"bad\nnginx: configuration"), "{log}");
    }

    #[test]
    fn a_message_with_a_control_character_is_escaped() {
        let name = "a\rb";
        let log = text_log(|| tracing::info!("Endpoint {name} changed."));
        assert!(log.contains(r"Endpoint a\rb changed."), "{log}");
    }

    #[test]
    fn plain_strings_print_bare_whether_passed_as_str_or_display() {
        let log = text_log(|| {
            tracing::info!(upstream = "kotaemon", source = %"consul", "One.");
        });
        assert!(log.contains("upstream=kotaemon source=consul"), "{log}");
    }
}
