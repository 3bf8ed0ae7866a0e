//! The HTTP/1.1 client of nginx's Lua update server: one connection a request (over loopback
//! TCP or a unix socket), framing by hyper's `client::conn::http1`, the secret as a bearer
//! token. Pushes are rare (one per membership change) and status polls once a second, so a
//! pool would buy nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};

use super::PushError;
use crate::config::{LuaConfig, LuaListen};

/// The largest reply read from the update server.
const MAX_REPLY: usize = 1 << 20;

/// What `GET /upstreamd/status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LuaStatus {
    /// The generation the shared dict holds (0 when none).
    pub generation: u64,
    /// `push`, `snapshot` or `none`: where the dict's list came from.
    pub source: String,
    /// The nginx master.
    pub master_pid: i32,
    /// Each worker's pid (as a string) and the generation it has loaded.
    #[serde(default)]
    pub workers: BTreeMap<String, u64>,
}

/// nginx's update server, or a fake in tests.
pub trait LuaEndpoint: Send + Sync {
    /// `POST /upstreamd/update` with `body`; the generation nginx stored.
    fn update(&self, body: String) -> BoxFuture<'_, Result<u64, PushError>>;
    /// `GET /upstreamd/status`.
    fn status(&self) -> BoxFuture<'_, Result<LuaStatus, PushError>>;
    /// The pids of `master`'s current (not shutting down) worker processes.
    fn workers(&self, master: i32) -> Result<BTreeSet<i32>, PushError>;
}

/// The real update server, at `lua_listen`, with the secret of `lua_secret_file`.
#[derive(Debug)]
pub struct HttpEndpoint {
    listen: LuaListen,
    secret_file: PathBuf,
    timeout: Duration,
}

impl HttpEndpoint {
    /// The endpoint `cfg` names; each request is bounded by `timeout`.
    pub fn new(cfg: &LuaConfig, timeout: Duration) -> Self {
        Self {
            listen: cfg.listen.clone(),
            secret_file: cfg.secret_file.clone(),
            timeout,
        }
    }

    /// The secret, read at each request so that a rotated file takes effect with nginx's next
    /// reload (which reads it too).
    fn secret(&self) -> Result<String, PushError> {
        std::fs::read_to_string(&self.secret_file)
            .map(|s| s.trim().to_owned())
            .map_err(|source| PushError::Secret {
                path: self.secret_file.clone(),
                source,
            })
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: String,
    ) -> Result<(StatusCode, Bytes), PushError> {
        let secret = self.secret()?;
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "upstreamd")
            .header(http::header::AUTHORIZATION, format!("Bearer {secret}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| PushError::Http(e.to_string()))?;
        let exchange = async {
            match &self.listen {
                LuaListen::Tcp(addr) => {
                    let stream = tokio::net::TcpStream::connect(addr).await;
                    exchange(stream.map_err(|e| self.connect_error(e))?, request).await
                }
                LuaListen::Unix(path) => {
                    let stream = tokio::net::UnixStream::connect(path).await;
                    exchange(stream.map_err(|e| self.connect_error(e))?, request).await
                }
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| PushError::Timeout(self.timeout))?
    }

    fn connect_error(&self, source: std::io::Error) -> PushError {
        PushError::Connect {
            listen: self.listen.to_string(),
            source,
        }
    }
}

async fn exchange<S>(
    stream: S,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), PushError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http = |e: hyper::Error| PushError::Http(e.to_string());
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let driver = tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_REPLY)
        .collect()
        .await
        .map_err(|e| PushError::Http(e.to_string()))?
        .to_bytes();
    // One request a connection: dropping the sender closes it, and the driver with it.
    drop(sender);
    driver.abort();
    Ok((status, body))
}

#[derive(Deserialize)]
struct Stored {
    generation: u64,
}

#[derive(Deserialize)]
struct Refusal {
    #[serde(default)]
    error: String,
    #[serde(default)]
    generation: Option<u64>,
}

/// The outcome of a reply that is not a 200.
fn refused(status: StatusCode, body: &[u8]) -> PushError {
    let refusal: Option<Refusal> = serde_json::from_slice(body).ok();
    match (status, refusal) {
        (
            StatusCode::CONFLICT,
            Some(Refusal {
                generation: Some(g),
                ..
            }),
        ) => PushError::Stale { generation: g },
        (status, refusal) => PushError::Rejected {
            status: status.as_u16(),
            error: refusal
                .map(|r| r.error)
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| {
                    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
                }),
        },
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, PushError> {
    serde_json::from_slice(body).map_err(|e| PushError::BadReply(e.to_string()))
}

impl LuaEndpoint for HttpEndpoint {
    fn update(&self, body: String) -> BoxFuture<'_, Result<u64, PushError>> {
        Box::pin(async move {
            let (status, reply) = self
                .request(Method::POST, "/upstreamd/update", body)
                .await?;
            if status != StatusCode::OK {
                return Err(refused(status, &reply));
            }
            Ok(parse::<Stored>(&reply)?.generation)
        })
    }

    fn status(&self) -> BoxFuture<'_, Result<LuaStatus, PushError>> {
        Box::pin(async move {
            let (status, reply) = self
                .request(Method::GET, "/upstreamd/status", String::new())
                .await?;
            if status != StatusCode::OK {
                return Err(refused(status, &reply));
            }
            parse(&reply)
        })
    }

    fn workers(&self, master: i32) -> Result<BTreeSet<i32>, PushError> {
        let children = crate::nginx::worker_pids(Pid::from_raw(master)).map_err(PushError::Proc)?;
        // Workers of an old generation still draining streams say "is shutting down": they
        // serve no new request, so they need not confirm.
        Ok(children
            .into_iter()
            .filter(|pid| {
                crate::nginx::read_cmdline(Pid::from_raw(*pid))
                    .is_ok_and(|c| c.trim() == "nginx: worker process")
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conflict_names_the_stored_generation_and_other_refusals_keep_nginx_words() {
        assert!(matches!(
            refused(
                StatusCode::CONFLICT,
                br#"{"error":"stale generation","generation":42}"#
            ),
            PushError::Stale { generation: 42 }
        ));
        let e = refused(
            StatusCode::BAD_REQUEST,
            br#"{"error":"upstreams.k.servers[2].address: not an IP literal with a port"}"#,
        );
        assert_eq!(
            e.to_string(),
            "nginx refused the push (400): upstreams.k.servers[2].address: not an IP literal with a port"
        );
        let e = refused(StatusCode::UNAUTHORIZED, b"<html>401</html>");
        assert!(e.to_string().contains("(401): <html>401</html>"), "{e}");
    }
}
