//! Who may use the console: the bearer token (an `Authorization: Bearer` header,
//! or a session cookie handed out after the token was typed into the sign-in
//! form), compared in constant time; and cross-site request forgery checks for
//! every POST (a per-process CSRF token in each form, plus the `Origin` and
//! `Sec-Fetch-Site` headers browsers send).
//!
//! Without a configured token (allowed only on a loopback address) every request
//! is let in, but only with a loopback `Host` header, so a web page cannot reach
//! the console through DNS rebinding.

use axum::http::HeaderMap;
use axum::http::header;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Name of the session cookie.
pub(crate) const SESSION_COOKIE: &str = "outbox_console_session";

/// Whether `presented` equals `expected`, in time independent of where they differ
/// and of their lengths (both are hashed to 32 bytes first).
pub(crate) fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    let presented = Sha256::digest(presented);
    let expected = Sha256::digest(expected);
    presented.ct_eq(&expected).into()
}

/// 32 random bytes as lowercase hex.
pub(crate) fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How a request got in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// `Authorization: Bearer` with the token: no browser sends it on its own, so no CSRF check.
    Bearer,
    /// The session cookie of a signed-in browser.
    Session,
    /// No token is configured (loopback only).
    Open,
}

impl Access {
    /// Whether POSTs need the form's CSRF token.
    pub(crate) fn needs_csrf(self) -> bool {
        self != Access::Bearer
    }
}

/// Why a request was turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Denied {
    /// No credentials: show the sign-in form.
    NoCredentials,
    /// A bearer token or session cookie that does not match.
    WrongCredentials,
    /// No token configured and the `Host` is not a loopback name.
    ForeignHost,
}

/// The console's secrets: the token's hash, the session value and the CSRF token.
pub(crate) struct Auth {
    token: Option<String>,
    session: String,
    csrf: String,
}

impl Auth {
    /// With `token` (`None`: open, loopback only); fresh session and CSRF values.
    pub(crate) fn new(token: Option<String>) -> Self {
        Auth {
            token,
            session: random_hex(),
            csrf: random_hex(),
        }
    }

    /// Whether a token is configured.
    pub(crate) fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Whether `presented` is the token.
    pub(crate) fn token_matches(&self, presented: &str) -> bool {
        match &self.token {
            Some(token) => constant_time_eq(presented.as_bytes(), token.as_bytes()),
            None => false,
        }
    }

    /// Let the request in, or say why not.
    pub(crate) fn check(&self, headers: &HeaderMap) -> Result<Access, Denied> {
        if self.token.is_none() {
            return if host_is_loopback(headers) {
                Ok(Access::Open)
            } else {
                Err(Denied::ForeignHost)
            };
        }
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let presented = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            return match presented {
                Some(token) if self.token_matches(token) => Ok(Access::Bearer),
                _ => Err(Denied::WrongCredentials),
            };
        }
        match cookie(headers, SESSION_COOKIE) {
            Some(session) if constant_time_eq(session.as_bytes(), self.session.as_bytes()) => {
                Ok(Access::Session)
            }
            Some(_) => Err(Denied::WrongCredentials),
            None => Err(Denied::NoCredentials),
        }
    }

    /// The `Set-Cookie` value that signs a browser in (for this process's lifetime).
    pub(crate) fn session_cookie(&self) -> String {
        format!(
            "{SESSION_COOKIE}={}; Path=/console; HttpOnly; SameSite=Strict",
            self.session
        )
    }

    /// The `Set-Cookie` value that signs a browser out.
    pub(crate) fn cleared_cookie() -> String {
        format!("{SESSION_COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0")
    }

    /// The CSRF token forms carry.
    pub(crate) fn csrf(&self) -> &str {
        &self.csrf
    }

    /// Whether a POST with `access` may go ahead: same origin (if the browser says)
    /// and, unless it came with the bearer token, the form's CSRF token.
    pub(crate) fn check_post(
        &self,
        access: Access,
        headers: &HeaderMap,
        form_csrf: Option<&str>,
    ) -> Result<(), &'static str> {
        if !same_origin(headers) {
            return Err("the request came from another site");
        }
        if access.needs_csrf() {
            match form_csrf {
                Some(csrf) if constant_time_eq(csrf.as_bytes(), self.csrf.as_bytes()) => {}
                _ => {
                    return Err(
                        "the form is stale or was not sent by this console; reload the page",
                    );
                }
            }
        }
        Ok(())
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then_some(value)
        })
}

/// The `Host` header's host part, without the port.
fn host_name(headers: &HeaderMap) -> Option<&str> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map(|(ip, _)| ip);
    }
    Some(host.rsplit_once(':').map_or(host, |(name, _)| name))
}

fn host_is_loopback(headers: &HeaderMap) -> bool {
    match host_name(headers) {
        Some(name) if name.eq_ignore_ascii_case("localhost") => true,
        Some(name) => name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// False when the browser says the request came from another origin.
fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return false;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let (Ok(origin), Some(host)) = (
        origin.to_str(),
        headers.get(header::HOST).and_then(|h| h.to_str().ok()),
    ) else {
        return false;
    };
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|authority| authority.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            if let Ok(value) = HeaderValue::from_str(value) {
                map.append(*name, value);
            }
        }
        map
    }

    const TOKEN: &str = "console-token-0123456789";

    #[test]
    fn compares_tokens_of_any_length_without_panicking() {
        assert!(constant_time_eq(b"same", b"same"));
        assert!(!constant_time_eq(b"same", b"Same"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(!constant_time_eq(TOKEN.as_bytes(), &TOKEN.as_bytes()[..10]));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn token_check_wants_the_right_bearer_or_session() {
        let auth = Auth::new(Some(TOKEN.to_owned()));
        assert_eq!(auth.check(&headers(&[])), Err(Denied::NoCredentials));
        let wrong = format!("Bearer {TOKEN}x");
        assert_eq!(
            auth.check(&headers(&[("authorization", &wrong)])),
            Err(Denied::WrongCredentials)
        );
        assert_eq!(
            auth.check(&headers(&[("authorization", TOKEN)])),
            Err(Denied::WrongCredentials),
            "without the Bearer scheme"
        );
        let right = format!("Bearer {TOKEN}");
        assert_eq!(
            auth.check(&headers(&[("authorization", &right)])),
            Ok(Access::Bearer)
        );
        let cookie = auth.session_cookie();
        let pair = cookie.split(';').next().unwrap_or_default();
        assert_eq!(
            auth.check(&headers(&[("cookie", &format!("theme=dark; {pair}"))])),
            Ok(Access::Session)
        );
        assert_eq!(
            auth.check(&headers(&[(
                "cookie",
                &format!("{SESSION_COOKIE}={TOKEN}")
            )])),
            Err(Denied::WrongCredentials),
            "the token itself is no session"
        );
    }

    #[test]
    fn without_a_token_only_loopback_hosts_get_in() {
        let auth = Auth::new(None);
        for host in [
            "127.0.0.1:9187",
            "localhost:9187",
            "[::1]:9187",
            "localhost",
        ] {
            assert_eq!(
                auth.check(&headers(&[("host", host)])),
                Ok(Access::Open),
                "{host}"
            );
        }
        for host in ["evil.example:9187", "10.0.0.1:9187", ""] {
            assert_eq!(
                auth.check(&headers(&[("host", host)])),
                Err(Denied::ForeignHost),
                "{host}"
            );
        }
    }

    #[test]
    fn posts_need_the_csrf_token_and_the_same_origin() {
        let auth = Auth::new(Some(TOKEN.to_owned()));
        let csrf = auth.csrf().to_owned();
        let same = headers(&[
            ("host", "127.0.0.1:9187"),
            ("origin", "http://127.0.0.1:9187"),
        ]);
        assert!(auth.check_post(Access::Session, &same, Some(&csrf)).is_ok());
        assert!(auth.check_post(Access::Session, &same, None).is_err());
        assert!(
            auth.check_post(Access::Session, &same, Some("guess"))
                .is_err()
        );
        assert!(auth.check_post(Access::Bearer, &same, None).is_ok());
        let foreign = headers(&[
            ("host", "127.0.0.1:9187"),
            ("origin", "http://evil.example"),
        ]);
        assert!(
            auth.check_post(Access::Bearer, &foreign, Some(&csrf))
                .is_err()
        );
        let cross = headers(&[("host", "127.0.0.1:9187"), ("sec-fetch-site", "cross-site")]);
        assert!(
            auth.check_post(Access::Session, &cross, Some(&csrf))
                .is_err()
        );
    }
}
