//! The web UI: plain HTML, CSS and JavaScript modules from `node/ui`, embedded
//! in the binary and served next to the API on the same loopback address.
//!
//! The files hold no data, so they need no login; everything the UI shows comes
//! from `/api/...` with the session cookie. They are still only served to a
//! loopback `Host` (DNS rebinding) and always with a strict
//! Content-Security-Policy: scripts only from this origin, no inline script,
//! no plugins, no framing, connections only back to this node.

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../ui/index.html"),
    },
    Asset {
        path: "/app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../ui/app.css"),
    },
    Asset {
        path: "/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../ui/app.js"),
    },
    Asset {
        path: "/api.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../ui/api.js"),
    },
    Asset {
        path: "/dom.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../ui/dom.js"),
    },
    Asset {
        path: "/vlist.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../ui/vlist.js"),
    },
    Asset {
        path: "/panels.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../ui/panels.js"),
    },
    Asset {
        path: "/favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../ui/favicon.svg"),
    },
];

/// The UI's routes. They carry no state, so they merge into the API router
/// whatever its state type.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut r = Router::new();
    for a in ASSETS {
        let (content_type, body) = (a.content_type, a.body);
        r = r.route(
            a.path,
            get(move |headers: HeaderMap| serve(headers, content_type, body)),
        );
    }
    r.route(
        "/index.html",
        get(|headers: HeaderMap| serve(headers, ASSETS[0].content_type, ASSETS[0].body)),
    )
    .layer(middleware::from_fn(loopback_only))
}

/// Refuses a non-loopback `Host` (DNS rebinding) before any file is served.
async fn loopback_only(req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| loopback_host(h).is_some());
    if !ok {
        return (StatusCode::FORBIDDEN, "requests must be addressed to a loopback host").into_response();
    }
    next.run(req).await
}

/// `host` if it is exactly a loopback name with an optional numeric port
/// (`127.0.0.1:8080`, `localhost`, `[::1]:80`), so that it is safe to repeat
/// in a header.
fn loopback_host(host: &str) -> Option<&str> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (name, after) = rest.split_once(']')?;
        let port = if after.is_empty() { "" } else { after.strip_prefix(':')? };
        (name, port)
    } else {
        match host.split_once(':') {
            Some((n, p)) => (n, p),
            None => (host, ""),
        }
    };
    if !port.bytes().all(|b| b.is_ascii_digit()) || port.len() > 5 || (port.is_empty() && host.ends_with(':')) {
        return None;
    }
    matches!(name, "127.0.0.1" | "localhost" | "::1").then_some(host)
}

/// The Content-Security-Policy for a page served to `host` (already checked to be loopback).
fn csp(host: &str) -> String {
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self' ws://{host}; font-src 'self'; object-src 'none'; base-uri 'none'; \
         form-action 'self'; frame-ancestors 'none'"
    )
}

async fn serve(headers: HeaderMap, content_type: &'static str, body: &'static [u8]) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(loopback_host)
        .unwrap_or("127.0.0.1");
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&csp(host)) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_loopback_hosts_pass() {
        assert_eq!(loopback_host("127.0.0.1:8080"), Some("127.0.0.1:8080"));
        assert_eq!(loopback_host("localhost"), Some("localhost"));
        assert_eq!(loopback_host("[::1]:80"), Some("[::1]:80"));
        assert_eq!(loopback_host("evil.example:80"), None);
        assert_eq!(loopback_host("127.0.0.1.evil.example"), None);
        assert_eq!(loopback_host("127.0.0.1:80; script-src *"), None);
        assert_eq!(loopback_host("127.0.0.1:"), None);
        assert_eq!(loopback_host("[::1]x"), None);
    }

    /// Serves the UI alone on a loopback port.
    async fn server() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router::<()>()).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn files_come_with_their_type_and_a_strict_policy() {
        let base = server().await;
        let http = reqwest::Client::new();
        for (path, ty) in [
            ("/", "text/html; charset=utf-8"),
            ("/index.html", "text/html; charset=utf-8"),
            ("/app.js", "text/javascript; charset=utf-8"),
            ("/app.css", "text/css; charset=utf-8"),
            ("/favicon.svg", "image/svg+xml"),
        ] {
            let resp = http
                .get(format!("{base}{path}"))
                .header(header::HOST, "127.0.0.1:4000")
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            assert_eq!(resp.headers()[header::CONTENT_TYPE], ty, "{path}");
            let policy = resp.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
            assert!(policy.starts_with("default-src 'self'; script-src 'self';"), "{policy}");
            assert!(policy.contains("connect-src 'self' ws://127.0.0.1:4000;"), "{policy}");
            assert!(!policy.contains("unsafe"), "{policy}");
            assert_eq!(resp.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
        for host in ["evil.example", "127.0.0.1:1;x"] {
            let resp = http
                .get(format!("{base}/"))
                .header(header::HOST, host)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{host}");
        }
    }

    #[test]
    fn the_page_has_no_inline_script_style_or_handler() {
        let html = std::str::from_utf8(ASSETS[0].body).unwrap();
        assert!(html.contains(r#"<script type="module" src="/app.js"></script>"#));
        assert_eq!(
            html.matches("<script").count(),
            1,
            "one external module, nothing inline"
        );
        assert!(!html.contains("style="), "no inline styles (style-src 'self')");
        let handler = html.split(|c: char| c.is_whitespace()).any(|w| {
            w.strip_prefix("on")
                .and_then(|r| r.split_once('='))
                .is_some_and(|(name, _)| !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase()))
        });
        assert!(!handler, "no inline event handlers");
    }

    #[test]
    fn the_scripts_never_put_data_into_html() {
        for a in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            let js = std::str::from_utf8(a.body).unwrap();
            for banned in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
            ] {
                assert!(!js.contains(banned), "{} uses {banned}", a.path);
            }
        }
    }
}
