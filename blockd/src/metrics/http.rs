//! A minimal HTTP/1.x server for the metrics endpoint: one request per connection
//! (`Connection: close`), `GET /metrics` (and `HEAD`) only. Request parsing is a pure
//! function ([`route`]); the connection handling has timeouts and a size limit on the head.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The longest request head accepted.
pub const MAX_HEAD: usize = 8 << 10;
/// Time a client gets to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What to answer to a request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics` (`head`: `HEAD /metrics`, no body).
    Metrics {
        head: bool,
    },
    /// `GET /`: a short page naming `/metrics`.
    Index,
    NotFound,
    MethodNotAllowed,
    BadRequest(&'static str),
}

/// Length of the request head in `buf` (through the blank line), if complete.
pub fn head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2))
}

/// Decides the answer from a complete request head.
pub fn route(head: &[u8]) -> Route {
    let Ok(text) = std::str::from_utf8(head) else {
        return Route::BadRequest("request head is not UTF-8");
    };
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest("malformed request line");
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest("unsupported HTTP version");
    }
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics { head: false },
        ("HEAD", "/metrics") => Route::Metrics { head: true },
        ("GET", "/") => Route::Index,
        ("GET" | "HEAD", _) => Route::NotFound,
        _ => Route::MethodNotAllowed,
    }
}

fn response(status: &str, content_type: &str, body: &str, send_body: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if send_body {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

async fn read_head(s: &mut TcpStream) -> Result<Vec<u8>, &'static str> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(n) = head_len(&buf) {
            buf.truncate(n);
            return Ok(buf);
        }
        if buf.len() > MAX_HEAD {
            return Err("request head too large");
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err("connection closed before the request head ended"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn handle<F, Fut>(mut s: TcpStream, render: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut s)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::debug!("metrics request: {e}");
            return;
        }
        Err(_) => return,
    };
    let reply = match route(&head) {
        Route::Metrics { head } => response("200 OK", super::CONTENT_TYPE, &render().await, !head),
        Route::Index => response(
            "200 OK",
            "text/plain; charset=utf-8",
            "blockd metrics: GET /metrics\n",
            true,
        ),
        Route::NotFound => response("404 Not Found", "text/plain", "not found\n", true),
        Route::MethodNotAllowed => {
            response("405 Method Not Allowed", "text/plain", "only GET\n", true)
        }
        Route::BadRequest(why) => response("400 Bad Request", "text/plain", why, true),
    };
    let _ = tokio::time::timeout(READ_TIMEOUT, async {
        let _ = s.write_all(&reply).await;
        let _ = s.shutdown().await;
    })
    .await;
}

/// Serves `listener` until `shutdown` completes; `render` produces the exposition per scrape.
pub async fn serve<F, Fut>(listener: TcpListener, render: F, shutdown: impl Future<Output = ()>)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => match a {
                Ok((s, _)) => {
                    tokio::spawn(handle(s, render.clone()));
                }
                Err(e) => {
                    tracing::warn!("metrics accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |s: &str| route(s.as_bytes());
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            r("HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics { head: true }
        );
        assert_eq!(r("GET / HTTP/1.1\r\n\r\n"), Route::Index);
        assert_eq!(r("GET /other HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("POST /metrics HTTP/1.1\r\n\r\n"), Route::MethodNotAllowed);
        assert!(matches!(r("GET /metrics\r\n\r\n"), Route::BadRequest(_)));
        assert!(matches!(
            r("GET /metrics HTTP/2\r\n\r\n"),
            Route::BadRequest(_)
        ));
        assert!(matches!(route(b"\xff\xfe\r\n\r\n"), Route::BadRequest(_)));
    }

    #[test]
    fn head_length() {
        assert_eq!(head_len(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_len(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_len(b"GET / HTTP/1.1\r\n"), None);
    }

    #[tokio::test]
    async fn serves_metrics_over_tcp() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(l, || async { "x 1\n".to_string() }, async {
            let _ = rx.await;
        }));
        let get = |req: &'static str| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
                .await
                .unwrap()
                .unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nx 1\n"), "{ok}");
        assert!(ok.contains("version=0.0.4"), "{ok}");
        let nf = get("GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let _ = tx.send(());
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
    }
}
