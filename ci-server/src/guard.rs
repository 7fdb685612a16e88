//! What a request must show before any route sees it, against the attacks
//! a CI server on a developer's machine invites:
//!
//! - **DNS rebinding**: a page of `evil.example` whose name is made to
//!   resolve to 127.0.0.1 is same-origin with this server in the browser's
//!   eyes, and could read logs. The `Host` it sends is its own name, so
//!   `Host` must be an IP address, `localhost`, the public URL's host or an
//!   allowed host, unless the request presents a configured token (which no
//!   page can know).
//! - **CSRF**: any page can make a browser send a form or a `no-cors`
//!   fetch here, and with no `API_TOKEN` (the default) that used to start a
//!   build running the page's command. State-changing requests must not come
//!   from another origin (`Origin`, `Sec-Fetch-Site`), and a body must be
//!   JSON, which a page can send cross-origin only after a CORS preflight
//!   this server never grants. The original UI form (urlencoded, to
//!   `/build` or `/api/builds`) is taken only with a same-origin `Origin` or
//!   `Referer`.
//!
//! [`headers`] adds what pages need against framing and sniffing.

use std::sync::Arc;

use warp::http::{HeaderMap, Method, StatusCode};
use warp::{Filter, Rejection};

use crate::api::ApiError;
use crate::config::ServerConfig;

/// The routes that take the original UI's urlencoded form.
const FORM_ROUTES: [&str; 2] = ["/build", "/api/builds"];

/// Rejects a request that fails the checks in the [module docs](self).
pub(crate) fn guard(config: Arc<ServerConfig>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and_then(
            move |method: Method, path: warp::path::FullPath, headers: HeaderMap| {
                let verdict = check(&config, &method, path.as_str(), &headers);
                async move { verdict.map_err(warp::reject::custom) }
            },
        )
        .untuple_one()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, message)
}

fn check(config: &ServerConfig, method: &Method, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    let host = header(headers, "host");
    let tokened = header(headers, "authorization").is_some_and(|auth| {
        [&config.agent_token, &config.api_token]
            .into_iter()
            .flatten()
            .any(|t| ci_core::auth::bearer_matches(Some(auth), t))
    });
    if let (Some(host), false) = (host, tokened) {
        let name = host_name(host);
        if !known_name(config, &name) {
            return Err(forbidden(format!(
                "Host {host:?} is not a name of this server; to serve it, set PUBLIC_URL or ALLOWED_HOSTS \
                 (a defence against DNS rebinding)"
            )));
        }
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    // A browser says where a request comes from; anything else says nothing.
    let origin = header(headers, "origin");
    let same_origin = |o: &str| {
        o != "null"
            && (host.is_some_and(|h| authority(o).eq_ignore_ascii_case(h))
                || config
                    .public_origin
                    .as_deref()
                    .is_some_and(|p| p.eq_ignore_ascii_case(o.trim_end_matches('/'))))
    };
    if let Some(o) = origin.filter(|o| !same_origin(o)) {
        return Err(forbidden(format!(
            "cross-origin request refused (Origin {o:?}); this server takes state-changing requests \
             from its own pages and from non-browser clients only"
        )));
    }
    if let Some(site) = header(headers, "sec-fetch-site").filter(|s| !matches!(*s, "same-origin" | "none")) {
        return Err(forbidden(format!(
            "cross-site request refused (Sec-Fetch-Site: {site})"
        )));
    }
    let has_body = header(headers, "transfer-encoding").is_some()
        || header(headers, "content-length").is_some_and(|l| l.trim() != "0");
    if !has_body {
        return Ok(());
    }
    let media = header(headers, "content-type")
        .map(|t| t.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default();
    match media.as_str() {
        "application/json" => Ok(()),
        "application/x-www-form-urlencoded" if FORM_ROUTES.contains(&path) => {
            let referer_same = header(headers, "referer").is_some_and(|r| {
                let o = r
                    .split_once("://")
                    .map_or("", |(_, rest)| rest.split('/').next().unwrap_or(""));
                host.is_some_and(|h| o.eq_ignore_ascii_case(h))
            });
            if origin.is_some() || referer_same {
                Ok(())
            } else {
                Err(forbidden(
                    "a form post needs a same-origin Origin or Referer header (a browser sends one); \
                     scripts should send JSON"
                        .into(),
                ))
            }
        }
        "" => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a request body needs Content-Type: application/json",
        )),
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type {other:?} is not accepted; send application/json"),
        )),
    }
}

/// The `host[:port]` of an origin or URL.
fn authority(origin: &str) -> &str {
    let rest = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

/// The host of a `Host` header or an authority, without the port,
/// lowercase.
pub(crate) fn host_name(authority: &str) -> String {
    let a = authority.trim();
    let name = if let Some(v6) = a.strip_prefix('[') {
        v6.split(']').next().unwrap_or(v6)
    } else {
        a.rsplit_once(':').map_or(a, |(n, _)| n)
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn known_name(config: &ServerConfig, name: &str) -> bool {
    name.parse::<std::net::IpAddr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
        || config.allowed_hosts.iter().any(|h| h == name)
}

/// Headers for every response: no framing, no sniffing, no referrers to
/// other sites, and a CSP that allows only this server's own scripts and
/// styles (the UI has no inline ones).
pub(crate) fn headers() -> warp::filters::reply::WithHeaders {
    let mut h = HeaderMap::new();
    for (name, value) in [
        (
            "content-security-policy",
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "same-origin"),
    ] {
        if let Ok(v) = warp::http::HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    }
    warp::reply::with::headers(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ServerConfig {
        let mut c = ServerConfig::new(ci_core::RepoUrl::parse("/r").unwrap(), "ci.sqlite");
        c.allowed_hosts = vec!["ci.example.com".into()];
        c.public_origin = Some("https://ci.example.com".into());
        c.api_token = Some("api-token-0123456789".into());
        c
    }

    fn req(method: Method, path: &str, headers: &[(&'static str, &str)]) -> Result<(), StatusCode> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, v.parse().unwrap());
        }
        check(&config(), &method, path, &h).map_err(|e| e.status())
    }

    #[test]
    fn hosts() {
        for ok in [
            "127.0.0.1:3000",
            "localhost:3000",
            "[::1]:3000",
            "10.1.2.3",
            "CI.example.com",
            "a.localhost",
        ] {
            assert_eq!(req(Method::GET, "/", &[("host", ok)]), Ok(()), "{ok}");
        }
        let rebound = [("host", "evil.example:3000")];
        assert_eq!(
            req(Method::GET, "/api/builds", &rebound),
            Err(StatusCode::FORBIDDEN)
        );
        let tokened = [
            ("host", "evil.example:3000"),
            ("authorization", "Bearer api-token-0123456789"),
        ];
        assert_eq!(req(Method::GET, "/api/builds", &tokened), Ok(()));
    }

    #[test]
    fn cross_origin_writes_are_refused() {
        let h = ("host", "127.0.0.1:3000");
        let json = ("content-type", "application/json");
        let body = ("content-length", "10");
        assert_eq!(req(Method::POST, "/api/builds", &[h, json, body]), Ok(()), "curl");
        let same = ("origin", "http://127.0.0.1:3000");
        assert_eq!(req(Method::POST, "/api/builds", &[h, json, body, same]), Ok(()));
        let public = ("origin", "https://ci.example.com");
        assert_eq!(req(Method::POST, "/api/builds", &[h, json, body, public]), Ok(()));
        for other in ["http://127.0.0.2:8000", "null", "http://127.0.0.1:3001"] {
            let o = ("origin", other);
            assert_eq!(
                req(Method::POST, "/api/builds", &[h, json, body, o]),
                Err(StatusCode::FORBIDDEN),
                "{other}"
            );
        }
        let site = ("sec-fetch-site", "cross-site");
        assert_eq!(
            req(Method::POST, "/build", &[h, json, body, site]),
            Err(StatusCode::FORBIDDEN)
        );
        // A typeless body (a no-cors fetch of a Blob) and text/plain.
        assert_eq!(
            req(Method::POST, "/api/builds", &[h, body]),
            Err(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        let text = ("content-type", "text/plain");
        assert_eq!(
            req(Method::POST, "/notify_agent", &[h, text, body]),
            Err(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        // No body at all (cancel): fine without an Origin.
        assert_eq!(req(Method::POST, "/api/builds/1/cancel", &[h]), Ok(()));
    }

    #[test]
    fn the_original_form_needs_a_same_origin_browser() {
        let h = ("host", "127.0.0.1:3000");
        let form = ("content-type", "application/x-www-form-urlencoded");
        let body = ("content-length", "10");
        assert_eq!(
            req(Method::POST, "/build", &[h, form, body]),
            Err(StatusCode::FORBIDDEN)
        );
        let same = ("origin", "http://127.0.0.1:3000");
        assert_eq!(req(Method::POST, "/build", &[h, form, body, same]), Ok(()));
        let referer = ("referer", "http://127.0.0.1:3000/?page=2");
        assert_eq!(req(Method::POST, "/build", &[h, form, body, referer]), Ok(()));
        let elsewhere = ("referer", "http://127.0.0.2:8000/");
        assert_eq!(
            req(Method::POST, "/build", &[h, form, body, elsewhere]),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            req(Method::POST, "/notify_agent", &[h, form, body, same]),
            Err(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            "a form only where the UI posts one"
        );
    }

    #[test]
    fn host_names() {
        assert_eq!(host_name("Example.COM:80"), "example.com");
        assert_eq!(host_name("[::1]:3000"), "::1");
        assert_eq!(host_name("localhost."), "localhost");
        assert_eq!(authority("http://a:1/x?y"), "a:1");
    }
}
