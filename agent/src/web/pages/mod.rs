//! The HTML pages: server-rendered with maud (escaped at compile time),
//! one module per page. A page's live region has `data-refresh`: the
//! embedded script fetches the page again with `?fragment=1` and swaps the
//! region in. Changes go through the JSON API (`data-api` forms).

pub mod files;
pub mod live;
pub mod overview;
pub mod prune;
pub mod repos;
pub mod restore;
pub mod tasks;
pub mod vm;

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;

use super::api::{authenticate, Caller};
use super::Web;

const CSS: &str = include_str!("../assets/app.css");
const JS: &str = include_str!("../assets/app.js");
const ICON: &[u8] = include_bytes!("../assets/icon.svg");

/// Bytes of the embedded assets a first page load fetches.
pub fn assets_len() -> usize {
    CSS.len() + JS.len() + ICON.len()
}

/// A logged-in caller, or a redirect to the login page.
pub struct Viewer(pub Caller);

impl FromRequestParts<Arc<Web>> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        web: &Arc<Web>,
    ) -> Result<Self, Self::Rejection> {
        authenticate(web, parts).map(Viewer).map_err(|_| {
            let next = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let q: String = url_encode(next);
            Redirect::to(&format!("/login?next={q}")).into_response()
        })
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `?fragment=1`: only the live region.
#[derive(Deserialize, Default)]
pub struct Fragment {
    #[serde(default)]
    pub fragment: Option<u8>,
}

impl Fragment {
    pub fn only(&self) -> bool {
        self.fragment == Some(1)
    }
}

/// The navigation, in order: (path, label).
const NAV: [(&str, &str); 7] = [
    ("/", "Overview"),
    ("/restore", "Restore"),
    ("/live", "Live restores"),
    ("/prune", "Prune simulator"),
    ("/tasks", "Tasks"),
    ("/repositories", "Repositories"),
    ("/files", "Files"),
];

/// The `<head>`: the page's title, the CSRF token the script sends back,
/// the embedded assets (their URLs change with the version: cached safely).
fn head(title: &str, csrf: &str) -> Markup {
    let v = env!("CARGO_PKG_VERSION");
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            meta name="csrf-token" content=(csrf);
            title { (title) " · Bulwark" }
            link rel="icon" href={"/assets/icon.svg?v=" (v)};
            link rel="stylesheet" href={"/assets/app.css?v=" (v)};
            script src={"/assets/app.js?v=" (v)} defer {}
        }
    }
}

/// A whole page: head, navigation, the caller, `body`.
pub fn layout(title: &str, here: &str, c: &Caller, body: Markup) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                (head(title, c.csrf.as_deref().unwrap_or("")))
                body {
                    a.skip href="#main" { "Skip to content" }
                    header.top {
                        span.brand { "Bulwark" }
                        nav aria-label="Main" {
                            ul {
                                @for (path, label) in NAV {
                                    li {
                                        @if path == here {
                                            a href=(path) aria-current="page" { (label) }
                                        } @else {
                                            a href=(path) { (label) }
                                        }
                                    }
                                }
                            }
                        }
                        form.who data-api="/api/v1/logout" data-then="/login" {
                            span { (c.user) " (" (c.role.as_str()) ")" }
                            button type="submit" { "Log out" }
                        }
                    }
                    main #main tabindex="-1" {
                        h1 { (title) }
                        (body)
                    }
                }
            }
        }
        .into_string(),
    )
}

/// The page itself or only its live region.
pub fn respond(
    f: &Fragment,
    title: &str,
    here: &str,
    c: &Caller,
    region: Markup,
    around: impl FnOnce(Markup) -> Markup,
) -> Response {
    if f.only() {
        Html(region.into_string()).into_response()
    } else {
        layout(title, here, c, around(region)).into_response()
    }
}

/// A live region refreshed every `secs`.
pub fn live_region(id: &str, url: &str, secs: u32, inner: Markup) -> Markup {
    html! {
        div id=(id) data-refresh=(url) data-every=(secs) aria-live="polite" { (inner) }
    }
}

/// A message for a form's outcome (filled by the script).
pub fn form_message() -> Markup {
    html! { p.msg role="status" aria-live="polite" {} }
}

#[derive(Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
}

/// `GET /login`.
pub async fn login(Query(q): Query<LoginQuery>) -> Html<String> {
    // Only a path on this site: never an open redirect.
    let next = q
        .next
        .filter(|n| n.starts_with('/') && !n.starts_with("//"))
        .unwrap_or_else(|| "/".into());
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                (head("Log in", ""))
                body.login {
                    main #main {
                        h1 { "Bulwark" }
                        form #login data-api="/api/v1/login" data-then=(next) {
                            label for="user" { "User" }
                            input #user name="user" autocomplete="username" required autofocus;
                            label for="password" { "Password" }
                            input #password name="password" type="password" autocomplete="current-password" required;
                            button type="submit" { "Log in" }
                            (form_message())
                        }
                    }
                }
            }
        }
        .into_string(),
    )
}

/// `GET /assets/{file}`: embedded in the binary.
pub async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind): (&'static [u8], &'static str) = match file.as_str() {
        "app.css" => (CSS.as_bytes(), "text/css; charset=utf-8"),
        "app.js" => (JS.as_bytes(), "text/javascript; charset=utf-8"),
        "icon.svg" => (ICON, "image/svg+xml"),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    r
}

/// Unix seconds as local time (`-` for none).
pub fn time(secs: Option<u64>) -> String {
    secs.and_then(|s| chrono::DateTime::from_timestamp(s as i64, 0))
        .map(|t| local(&t))
        .unwrap_or_else(|| "-".into())
}

/// `2026-03-01 14:00` in local time.
pub fn local(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.with_timezone(&chrono::Local)
        .format("%Y-%m-%d %H:%M")
        .to_string()
}

pub fn bytes(n: u64) -> String {
    crate::units::human(n)
}

/// `1h 2m`, `34s`.
pub fn secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

/// A status word with its class (`ok`, `bad`, `warn`, `idle`).
pub fn badge(text: &str, class: &str) -> Markup {
    html! { span class={"badge " (class)} { (text) } }
}
