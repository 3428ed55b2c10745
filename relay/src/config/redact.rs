//! Masking passwords in URLs and in text that may quote them.

use crate::percent::percent_decode;

/// `url` with the password of its userinfo and any `password=` parameter replaced
/// by `***`, for logs, `Debug` and summaries. Masks too much rather than too
/// little: everything between the first `:` of the userinfo and its last `@`.
pub fn redact_url(url: &str) -> String {
    let mut redacted = url.to_owned();
    if let Some(scheme_end) = redacted.find("://") {
        let authority_start = scheme_end + 3;
        let authority_end = redacted[authority_start..]
            .find(['/', '?', '#'])
            .map_or(redacted.len(), |i| i + authority_start);
        // An unencoded '@' or '/' in the password: the userinfo ends at the last '@'.
        let authority_end = redacted[authority_start..]
            .rfind('@')
            .map_or(authority_end, |at| {
                authority_end.max(authority_start + at + 1)
            });
        if let Some(at) = redacted[authority_start..authority_end].rfind('@') {
            let userinfo = &redacted[authority_start..authority_start + at];
            if let Some(colon) = userinfo.find(':') {
                redacted.replace_range(authority_start + colon + 1..authority_start + at, "***");
            }
        }
    }
    let mut from = 0;
    while let Some(found) = redacted[from..].to_ascii_lowercase().find("password=") {
        let value_start = from + found + "password=".len();
        let value_end = redacted[value_start..]
            .find('&')
            .map_or(redacted.len(), |i| i + value_start);
        redacted.replace_range(value_start..value_end, "***");
        from = value_start + 3;
    }
    redacted
}

/// The password of `url`'s userinfo, as written (still percent-encoded).
fn url_password(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (userinfo, _) = rest.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    Some(password).filter(|p| !p.is_empty())
}

/// `text` (a library's error message) with `url`'s password, raw and
/// percent-decoded, replaced by `***`. Passwords shorter than four characters
/// are left alone: replacing them would garble the message.
pub fn scrub_password(text: &str, url: &str) -> String {
    let mut text = text.replace(url, &redact_url(url));
    if let Some(password) = url_password(url) {
        let decoded = percent_decode(password);
        for secret in [password, decoded.as_str()] {
            if secret.len() >= 4 {
                text = text.replace(secret, "***");
            }
        }
    }
    text
}
