//! What can go wrong with an etcd source, and etcd-client's errors as sentences.

use std::path::PathBuf;
use std::time::Duration;

use crate::sources::retry::{error_chain, root_cause};

/// Why an etcd source could not be set up or an etcd request failed. Never carries the
/// password.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// `prefix` is empty: it would follow every key of the cluster.
    #[error("the etcd prefix must not be empty")]
    EmptyPrefix,
    /// No endpoints.
    #[error("at least one etcd endpoint is needed")]
    NoEndpoints,
    /// An endpoint that is not `http://host:port`, `https://host:port` or `host:port`.
    #[error("etcd endpoint {0:?} must be http://host:port, https://host:port or host:port")]
    BadEndpoint(String),
    /// A TLS setting that cannot work with the rest.
    #[error("etcd TLS: {0}")]
    Tls(&'static str),
    /// A username without a password or the other way round.
    #[error("etcd username and password must be given together")]
    Credentials,
    /// A TLS file could not be read.
    #[error("failed to read etcd {what} `{path}`: {error}")]
    ReadFile {
        /// Which setting (`ca_file`, `cert_file`, `key_file`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A TLS file without a PEM block.
    #[error("etcd {what} `{path}` holds no PEM block")]
    NotPem {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A request failed; `detail` is the error chain.
    #[error("etcd {op} failed: {detail}")]
    Request {
        /// What was asked: `connect`, `list`, `watch`.
        op: &'static str,
        /// The error chain, one line.
        detail: String,
    },
    /// A request got no answer in time.
    #[error("etcd {op} got no answer within {:.1} s", .after.as_secs_f64())]
    Timeout {
        /// What was asked.
        op: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The server ended the watch stream.
    #[error("etcd closed the watch stream")]
    WatchClosed,
}

impl EtcdError {
    pub(super) fn request(op: &'static str, e: &etcd_client::Error) -> Self {
        Self::Request {
            op,
            detail: describe(e),
        }
    }
}

/// An etcd client error as a sentence. A gRPC status reads as its code's meaning, etcd's
/// message and the root cause; tonic's own `Display` of a status would print its cause with
/// `Debug` (`tonic::transport::Error(Transport, hyper::Error(…))`).
fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            // tonic's descriptions start with a capital: mid-line, they should not.
            let described = status.code().description();
            let mut chars = described.chars();
            let meaning: String = chars
                .next()
                .map(|c| c.to_lowercase().chain(chars).collect())
                .unwrap_or_default();
            let mut line = match status.message().trim() {
                "" => meaning.to_owned(),
                message => format!("{meaning}: {message}"),
            };
            if let Some(source) = std::error::Error::source(status) {
                let root = root_cause(source).to_string();
                if !line.contains(&root) {
                    line = format!("{line}: {root}");
                }
            }
            line
        }
        // etcd-client's error keeps its cause out of `source()`: follow the transport's.
        etcd_client::Error::TransportError(t) => error_chain(t),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_status_reads_as_a_sentence_without_debug_text() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let mut status = tonic::Status::unavailable("tcp connect error");
        status.set_source(std::sync::Arc::new(refused));
        let line = EtcdError::request("list", &etcd_client::Error::GRpcStatus(status)).to_string();
        assert_eq!(
            line,
            "etcd list failed: the service is currently unavailable: tcp connect error: connection refused"
        );
        let denied = tonic::Status::permission_denied("etcdserver: permission denied");
        let line = describe(&etcd_client::Error::GRpcStatus(denied));
        assert!(line.ends_with(": etcdserver: permission denied"), "{line}");
        assert!(!line.contains("code:") && !line.contains('\''), "{line}");
    }
}
