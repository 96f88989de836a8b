//! The web dashboard: one page every node serves at `/`, and its two
//! assets under `/ui/`.
//!
//! - **No data here.** The page, its script and its stylesheet are static
//!   text built into the binary (`include_str!`), so they are public
//!   routes (`permissions::PUBLIC`). Everything the page shows it reads
//!   from the API with the key the user types in, which the script keeps
//!   in `sessionStorage` and sends as `Authorization: Bearer`; the event
//!   stream gets it as its first message (`{"auth": key}`), never in a URL.
//! - **Live, not polling.** The script subscribes to the event stream and,
//!   on an event, updates the affected row or re-fetches one small
//!   resource, debounced; a refresh every 15 s is the only timer, a safety
//!   net. It resumes with `?since=` after a drop and shows gaps.
//! - **Strict headers.** A Content-Security-Policy that allows scripts,
//!   styles and connections to this origin only (and its WebSocket), no
//!   inline script, no framing; `nosniff`; `no-cache`, so a new binary's
//!   page is picked up at once.
//! - **No build step, nothing external.** Plain HTML, CSS and JS, no
//!   framework, no CDN: the page works on an air-gapped cluster.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

/// The page.
const INDEX_HTML: &str = include_str!("dashboard/index.html");
/// Its script.
const APP_JS: &str = include_str!("dashboard/app.js");
/// Its stylesheet.
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// What the page may load and connect to: this origin only (and its
/// WebSocket), nothing inline, no plugins, no framing, no forms elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self' ws: wss:; \
     object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// `GET /`: the dashboard page.
#[utoipa::path(
    get,
    path = "/",
    responses((status = 200, description = "The dashboard page", content_type = "text/html", body = String))
)]
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /ui/app.js`.
#[utoipa::path(
    get,
    path = "/ui/app.js",
    responses((status = 200, description = "The dashboard's script", content_type = "text/javascript", body = String))
)]
pub async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /ui/style.css`.
#[utoipa::path(
    get,
    path = "/ui/style.css",
    responses((status = 200, description = "The dashboard's style sheet", content_type = "text/css", body = String))
)]
pub async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_name_nothing_outside_this_origin() {
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("style.css", STYLE_CSS),
        ] {
            for scheme in ["http://", "https://", "//cdn", "ws://", "wss://"] {
                assert!(!text.contains(scheme), "{name} names `{scheme}`");
            }
        }
    }

    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let page = INDEX_HTML.to_lowercase();
        assert!(page.contains("<script src=\"/ui/app.js\""));
        assert!(!page.contains("<script>"), "inline script");
        assert!(!page.contains("<style"), "inline style");
        assert!(!page.contains(" style="), "inline style attribute");
        // No inline event handlers (`onclick=`, `onload=`, ...).
        for (at, _) in page.match_indices(" on") {
            let name: String = page[at + 1..]
                .chars()
                .take_while(char::is_ascii_alphabetic)
                .collect();
            let after = page[at + 1 + name.len()..].trim_start();
            assert!(!after.starts_with('='), "inline handler `{name}`");
        }
    }
}
