//! HTML escaping and the page frame. Everything that comes from the database,
//! the request or the configuration goes through [`escape`] before it reaches a page.

use std::fmt::Write as _;

/// `text` safe inside HTML element content and inside quoted attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '`' => out.push_str("&#96;"),
            // Control characters other than tab and newlines render as nothing useful.
            c if c.is_control() && !matches!(c, '\t' | '\n' | '\r') => {
                let _ = write!(out, "&#x{:x};", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// The first `max_bytes` of `text` (cut at a character boundary) and whether it was cut.
pub(crate) fn truncate(text: &str, max_bytes: usize) -> (&str, bool) {
    if text.len() <= max_bytes {
        return (text, false);
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

/// A query string (`a=1&b=x`) from pairs, percent-encoded; escape it again for an attribute.
pub(crate) fn query_string<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (key, value) in pairs {
        if !value.is_empty() {
            serializer.append_pair(key, value);
        }
    }
    serializer.finish()
}

const STYLE: &str = "\
*{box-sizing:border-box}\
body{font-family:system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9;line-height:1.4}\
header{background:#1f2937;color:#fff;padding:.6rem 1rem;display:flex;flex-wrap:wrap;gap:1rem;align-items:center}\
header a{color:#fff;text-decoration:none;font-weight:600}\
header form{margin-left:auto}\
main{padding:1rem;max-width:72rem;margin:0 auto}\
h1{font-size:1.3rem;margin:.2rem 0 1rem}\
h2{font-size:1.1rem;margin:1.2rem 0 .5rem}\
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(11rem,1fr));gap:.6rem}\
.card{background:#fff;border:1px solid #d6d9de;border-radius:6px;padding:.6rem}\
.card .label{font-size:.8rem;color:#57606a}\
.card .value{font-size:1.2rem;font-weight:600;overflow-wrap:anywhere}\
.scroll{overflow-x:auto;background:#fff;border:1px solid #d6d9de;border-radius:6px}\
table{border-collapse:collapse;width:100%;font-size:.9rem}\
th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid #eaecef;vertical-align:top}\
td.error,td.wrap{overflow-wrap:anywhere;max-width:28rem}\
pre{background:#fff;border:1px solid #d6d9de;border-radius:6px;padding:.6rem;overflow-x:auto;\
white-space:pre-wrap;overflow-wrap:anywhere;font-size:.85rem}\
form.filters{display:flex;flex-wrap:wrap;gap:.5rem;align-items:flex-end;margin-bottom:.8rem}\
form.filters label{display:flex;flex-direction:column;font-size:.8rem;flex:1 1 9rem}\
input,button{font:inherit;padding:.35rem .5rem;border:1px solid #b6bbc2;border-radius:4px}\
button{background:#1f6feb;color:#fff;border-color:#1f6feb;cursor:pointer}\
button.danger{background:#cf222e;border-color:#cf222e}\
button.plain{background:#fff;color:#1b1f24}\
.actions{display:flex;flex-wrap:wrap;gap:.5rem;margin:.6rem 0}\
.notice{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:.5rem .7rem;margin:.6rem 0}\
.problem{background:#ffebe9;border:1px solid #cf222e;border-radius:6px;padding:.5rem .7rem;margin:.6rem 0}\
.muted{color:#57606a;font-size:.85rem}\
.paging{display:flex;gap:1rem;margin:.6rem 0}\
@media (max-width:40rem){table.rows tr:first-child{display:none}\
table.rows tr{display:block;border-bottom:1px solid #d6d9de;padding:.3rem 0}\
table.rows td{display:block;border:none;padding:.1rem .5rem;max-width:none}\
table.rows td[data-label]::before{content:attr(data-label) \": \";font-weight:600;color:#57606a}}\
";

/// A whole page: `body` (already escaped HTML) in the frame with the navigation.
/// `nonce` allows the page's own inline script and style under the CSP;
/// `csrf` (when signed in) goes into the sign-out form.
pub(crate) fn page(title: &str, nonce: &str, csrf: Option<&str>, body: &str) -> String {
    let sign_out = match csrf {
        Some(csrf) => format!(
            "<form method=\"post\" action=\"/console/logout\"><input type=\"hidden\" name=\"csrf\" \
             value=\"{}\"><button class=\"plain\" type=\"submit\">Sign out</button></form>",
            escape(csrf)
        ),
        None => String::new(),
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · outbox-relay console</title><style nonce=\"{nonce}\">{STYLE}</style></head>\
         <body><header><a href=\"/console\">outbox-relay</a><a href=\"/console\">Overview</a>\
         <a href=\"/console/dead-letters\">Dead letters</a>{sign_out}</header>\
         <main>{body}</main></body></html>\n",
        title = escape(title),
        nonce = escape(nonce),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_character_that_can_leave_text_or_an_attribute() {
        assert_eq!(
            escape("<script>alert('x')</script> \"a\" & `b`"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &quot;a&quot; &amp; &#96;b&#96;"
        );
        assert_eq!(escape("nul\u{0}bell\u{7}"), "nul&#x0;bell&#x7;");
        assert_eq!(escape("ok ü 😀\n"), "ok ü 😀\n");
    }

    #[test]
    fn truncates_at_a_character_boundary() {
        assert_eq!(truncate("abc", 5), ("abc", false));
        assert_eq!(truncate("aüb", 2), ("a", true));
        assert_eq!(truncate("", 0), ("", false));
    }

    #[test]
    fn query_strings_are_percent_encoded_and_skip_empty_values() {
        assert_eq!(
            query_string([("event_type", "a&b=<c>"), ("error", ""), ("page", "2")]),
            "event_type=a%26b%3D%3Cc%3E&page=2"
        );
    }
}
