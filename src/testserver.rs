//! A tiny backend for demos and tests: every path answers 200 with `NAME\n` and `X-Backend: NAME`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderValue;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serve on an already bound listener until the task is dropped.
pub async fn serve(listener: TcpListener, name: String, delay: Duration) {
    let body = Bytes::from(format!("{name}\n"));
    let header = HeaderValue::from_str(&name).unwrap_or(HeaderValue::from_static("testserver"));
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let (body, header) = (body.clone(), header.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (body, header) = (body.clone(), header.clone());
                async move {
                    // Read the request body before answering, as a real application does: an
                    // answer to an unread body makes hyper close the connection with a reset.
                    let _ = req.into_body().collect().await;
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let mut resp = Response::new(Full::new(body));
                    resp.headers_mut().insert("x-backend", header);
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// Bind `addr` and serve; the name defaults to the bound address.
pub async fn run(addr: SocketAddr, name: Option<String>, delay: Duration) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let name = name.unwrap_or_else(|| local.to_string());
    tracing::info!("testserver {name} listening on http://{local}");
    serve(listener, name, delay).await;
    Ok(())
}
