//! The console's pages, rendered from plain data. Every value from the database
//! or the request is escaped here, at the one place it meets the markup.
//!
//! Over 600 lines on purpose: one rendering function per page (overview, list,
//! detail, confirmation, sign-in), mostly markup, kept in one file so that the
//! escaping rule has one place.

use std::fmt::Write as _;

use super::actions::{Action, Selection};
use super::filters::{FIELDS, ListQuery};
use super::html::{escape, page, query_string, truncate};
use crate::admin::{DeadLetter, Status};
use crate::resilience::BreakerState;
use crate::route::Route;

/// Longest payload shown on a detail page, in bytes; the rest is cut.
pub(crate) const MAX_PAYLOAD_SHOWN_BYTES: usize = 64 * 1024;
/// Payloads up to this size are pretty-printed; larger ones are shown as stored.
const MAX_PRETTY_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Longest last error shown in the list, in bytes.
const MAX_LIST_ERROR_BYTES: usize = 300;

/// What every page needs: the CSP nonce, the forms' CSRF token, and whether
/// to offer signing out (a session cookie is in use).
pub(crate) struct Frame {
    /// Nonce of this response's inline script and style.
    pub(crate) nonce: String,
    /// CSRF token for the forms.
    pub(crate) csrf: String,
    /// Show the sign-out button.
    pub(crate) sign_out: bool,
}

impl Frame {
    fn render(&self, title: &str, body: &str) -> String {
        page(
            title,
            &self.nonce,
            self.sign_out.then_some(self.csrf.as_str()),
            body,
        )
    }

    fn csrf_input(&self) -> String {
        format!(
            "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
            escape(&self.csrf)
        )
    }
}

/// The sign-in form; `problem` says why the last attempt failed.
pub(crate) fn login(frame: &Frame, problem: Option<&str>) -> String {
    let problem = problem
        .map(|p| format!("<p class=\"problem\">{}</p>", escape(p)))
        .unwrap_or_default();
    let body = format!(
        "<h1>Sign in</h1>{problem}<form method=\"post\" action=\"/console/login\" class=\"filters\">\
         <label>Console token<input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\" \
         required autofocus></label><button type=\"submit\" id=\"sign-in\">Sign in</button></form>\
         <p class=\"muted\">The token is console.token_file or OUTBOX_RELAY__CONSOLE__TOKEN of this relay.</p>"
    );
    frame.render("Sign in", &body)
}

/// What the overview shows, from the relay's stats and a status query.
pub(crate) struct Overview {
    /// The outbox status, or why it could not be read.
    pub(crate) status: Result<Status, String>,
    /// Circuit breaker of the sink.
    pub(crate) breaker: BreakerState,
    /// Start-up is over.
    pub(crate) started: bool,
    /// The last database call succeeded.
    pub(crate) database_reachable: bool,
    /// The WAL source runs (else polling).
    pub(crate) wal: bool,
    /// This instance leads its slot (WAL).
    pub(crate) wal_leader: bool,
    /// Sampled slot lag in bytes (WAL).
    pub(crate) wal_lag_bytes: i64,
    /// Events published since start.
    pub(crate) published: u64,
    /// Events dead-lettered since start.
    pub(crate) dead_lettered_since_start: u64,
    /// Events per second and the seconds it is averaged over.
    pub(crate) rate: Option<(f64, f64)>,
}

fn card(out: &mut String, id: &str, label: &str, value: &str) {
    let _ = write!(
        out,
        "<div class=\"card\" id=\"{}\"><div class=\"label\">{}</div><div class=\"value\">{}</div></div>",
        escape(id),
        escape(label),
        escape(value)
    );
}

fn seconds(secs: f64) -> String {
    if secs < 120.0 {
        format!("{secs:.1} s")
    } else if secs < 7_200.0 {
        format!("{:.1} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3_600.0)
    }
}

/// The overview page.
pub(crate) fn overview(frame: &Frame, data: &Overview) -> String {
    let mut cards = String::new();
    let na = "n/a".to_owned();
    let status = data.status.as_ref().ok();
    card(
        &mut cards,
        "backlog",
        "Backlog (pending events)",
        &status.map_or(na.clone(), |s| s.pending.to_string()),
    );
    card(
        &mut cards,
        "oldest-pending",
        "Oldest pending",
        &status
            .and_then(|s| s.oldest_pending_secs)
            .map_or_else(|| "none".to_owned(), seconds),
    );
    card(
        &mut cards,
        "publish-rate",
        "Publish rate",
        &data.rate.map_or(na.clone(), |(rate, over)| {
            format!("{rate:.1}/s (last {})", seconds(over))
        }),
    );
    card(
        &mut cards,
        "dead-letters",
        "Dead letters",
        &status.map_or(na.clone(), |s| s.dead_lettered.to_string()),
    );
    card(
        &mut cards,
        "blocked",
        "Blocked (key held)",
        &status.map_or(na.clone(), |s| s.blocked.to_string()),
    );
    card(
        &mut cards,
        "retrying",
        "Waiting for retry",
        &status.map_or(na.clone(), |s| s.retrying.to_string()),
    );
    card(
        &mut cards,
        "breaker",
        "Circuit breaker",
        match data.breaker {
            BreakerState::Closed => "closed (broker answers)",
            BreakerState::Open => "open (broker failing)",
            BreakerState::HalfOpen => "half-open (probing)",
        },
    );
    let slot_lag = if data.wal {
        format!("{} bytes", data.wal_lag_bytes)
    } else {
        "n/a (polling source)".to_owned()
    };
    card(&mut cards, "slot-lag", "Slot lag", &slot_lag);
    let paused = status.map_or(na.clone(), |s| {
        if s.pauses.is_empty() {
            "no".to_owned()
        } else {
            s.pauses
                .iter()
                .map(|p| {
                    format!(
                        "group {} since {} by {}{}",
                        p.instance_group,
                        p.paused_at.format("%Y-%m-%d %H:%M:%S UTC"),
                        p.paused_by,
                        if p.reason.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", p.reason)
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        }
    });
    card(&mut cards, "paused", "Paused", &paused);
    card(
        &mut cards,
        "source",
        "Source",
        match (data.wal, data.wal_leader) {
            (false, _) => "polling",
            (true, true) => "WAL (slot leader)",
            (true, false) => "WAL (standby)",
        },
    );
    card(
        &mut cards,
        "state",
        "Relay",
        match (data.started, data.database_reachable) {
            (false, _) => "starting",
            (true, true) => "running",
            (true, false) => "running, database unreachable",
        },
    );
    card(
        &mut cards,
        "published",
        "Published since start",
        &data.published.to_string(),
    );
    card(
        &mut cards,
        "dead-lettered-since-start",
        "Dead-lettered since start",
        &data.dead_lettered_since_start.to_string(),
    );
    let mut body = format!("<h1>Overview</h1><div class=\"cards\">{cards}</div>");
    match &data.status {
        Ok(status) => {
            let _ = write!(body, "<h2>Live relays</h2>");
            if status.instances.is_empty() {
                body.push_str("<p class=\"muted\">none holds an instance lease (the WAL source takes none)</p>");
            } else {
                body.push_str(
                    "<div class=\"scroll\"><table><tr><th>Instance</th><th>Partitions</th></tr>",
                );
                for instance in &status.instances {
                    let _ = write!(
                        body,
                        "<tr><td class=\"wrap\">{}</td><td>{}</td></tr>",
                        escape(&instance.id),
                        instance.partitions
                    );
                }
                body.push_str("</table></div>");
            }
            if !status.slots.is_empty() {
                body.push_str("<h2>Replication slots</h2><div class=\"scroll\"><table><tr><th>Slot</th>\
                    <th>Streaming</th><th>Lag</th><th>Retained</th><th>WAL status</th><th>State</th></tr>");
                let bytes =
                    |b: Option<i64>| b.map_or_else(|| "n/a".to_owned(), |b| format!("{b} bytes"));
                for slot in &status.slots {
                    let _ = write!(
                        body,
                        "<tr><td class=\"wrap\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        escape(&slot.name),
                        if slot.active { "yes" } else { "no" },
                        bytes(slot.lag_bytes),
                        bytes(slot.retained_bytes),
                        escape(slot.wal_status.as_deref().unwrap_or("n/a")),
                        escape(slot.lifecycle.as_deref().unwrap_or("n/a")),
                    );
                }
                body.push_str("</table></div>");
            }
        }
        Err(problem) => {
            let _ = write!(
                body,
                "<p class=\"problem\">Cannot read the outbox status: {}</p>",
                escape(problem)
            );
        }
    }
    body.push_str("<p class=\"muted\">Counters are this instance's since it started; backlog and dead letters are the whole schema's.</p>");
    frame.render("Overview", &body)
}

fn time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map_or_else(
        || "n/a".to_owned(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

const SELECT_ALL_SCRIPT: &str = "\
document.getElementById('select-all').addEventListener('change',function(e){\
document.querySelectorAll('input.pick').forEach(function(c){c.checked=e.target.checked;});});";

/// The dead-letter list: filters, one page of rows, paging, and the selection form.
pub(crate) fn dead_letters(
    frame: &Frame,
    list: &ListQuery,
    problems: &[String],
    rows: Result<&[DeadLetter], &str>,
    has_next: bool,
) -> String {
    let mut body = String::from(
        "<h1>Dead letters</h1><form method=\"get\" action=\"/console/dead-letters\" class=\"filters\">",
    );
    for (name, label) in FIELDS {
        let kind = if matches!(name, "since" | "until") {
            "placeholder=\"2026-01-31T14:00\""
        } else {
            ""
        };
        let _ = write!(
            body,
            "<label>{}<input type=\"text\" name=\"{}\" value=\"{}\" {kind}></label>",
            escape(label),
            escape(name),
            escape(list.field(name))
        );
    }
    body.push_str(
        "<button type=\"submit\">Filter</button><a href=\"/console/dead-letters\">Clear</a></form>",
    );
    for problem in problems {
        let _ = write!(body, "<p class=\"problem\">{}</p>", escape(problem));
    }
    let rows = match rows {
        Ok(rows) => rows,
        Err(problem) => {
            let _ = write!(
                body,
                "<p class=\"problem\">Cannot read the dead letters: {}</p>",
                escape(problem)
            );
            return frame.render("Dead letters", &body);
        }
    };
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/console/confirm\">{}<div class=\"actions\">\
         <button type=\"submit\" name=\"action\" value=\"retry\" id=\"retry-selected\">Retry selected</button>\
         <button type=\"submit\" name=\"action\" value=\"purge\" class=\"danger\" id=\"purge-selected\">Purge selected</button></div>\
         <div class=\"scroll\"><table id=\"dead-letters\" class=\"rows\"><tr><th><input type=\"checkbox\" id=\"select-all\" \
         aria-label=\"select all\"></th><th>Event</th><th>Type</th><th>Aggregate</th><th>Status</th>\
         <th>Attempts</th><th>Last failed</th><th>Last error</th></tr>",
        frame.csrf_input()
    );
    if rows.is_empty() {
        body.push_str("<tr><td colspan=\"8\">No dead letters match.</td></tr>");
    }
    for row in rows {
        let (error, cut) = truncate(&row.last_error, MAX_LIST_ERROR_BYTES);
        let _ = write!(
            body,
            "<tr data-event-id=\"{id}\"><td><input type=\"checkbox\" class=\"pick\" name=\"id\" value=\"{id}\" \
             aria-label=\"select {id}\"></td><td class=\"wrap\" data-label=\"Event\"><a href=\"/console/dead-letters/{id}\">{id}</a></td>\
             <td class=\"wrap\" data-label=\"Type\">{event_type}</td><td class=\"wrap\" data-label=\"Aggregate\">{aggregate_type} {aggregate_id}</td>\
             <td data-label=\"Status\">{status}</td><td data-label=\"Attempts\">{attempts}</td><td data-label=\"Last failed\">{failed}</td>\
             <td class=\"error\" data-label=\"Last error\">{error}{more}</td></tr>",
            id = row.event_id,
            event_type = escape(&row.event_type),
            aggregate_type = escape(&row.aggregate_type),
            aggregate_id = escape(&row.aggregate_id),
            status = escape(&row.status),
            attempts = row.attempts,
            failed = time(row.last_failed_at),
            error = escape(error),
            more = if cut { "…" } else { "" },
        );
    }
    body.push_str("</table></div></form><div class=\"paging\">");
    let link = |page: i64| {
        let mut pairs = list.filter_pairs();
        let page = page.to_string();
        pairs.push(("page", page.as_str()));
        escape(&format!("/console/dead-letters?{}", query_string(pairs)))
    };
    if list.page > 1 {
        let _ = write!(
            body,
            "<a href=\"{}\" id=\"prev\">← Previous</a>",
            link(list.page - 1)
        );
    }
    let _ = write!(body, "<span>Page {}</span>", list.page);
    if has_next {
        let _ = write!(
            body,
            "<a href=\"{}\" id=\"next\">Next →</a>",
            link(list.page + 1)
        );
    }
    let _ = write!(
        body,
        "</div><script nonce=\"{}\">{SELECT_ALL_SCRIPT}</script>",
        escape(&frame.nonce)
    );
    frame.render("Dead letters", &body)
}

/// Pretty JSON (when it parses and is not huge), cut to [`MAX_PAYLOAD_SHOWN_BYTES`];
/// with a note on what was cut.
fn shown_json(text: &str) -> (String, Option<String>) {
    let pretty = if text.len() <= MAX_PRETTY_PAYLOAD_BYTES {
        serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|value| serde_json::to_string_pretty(&value).ok())
    } else {
        None
    };
    let full = pretty.unwrap_or_else(|| text.to_owned());
    let (shown, cut) = truncate(&full, MAX_PAYLOAD_SHOWN_BYTES);
    let note = cut.then(|| {
        format!(
            "Truncated: showing the first {} of {} bytes (the CLI's dead-letters show --json prints it whole).",
            shown.len(),
            full.len()
        )
    });
    (shown.to_owned(), note)
}

/// One event's detail page.
pub(crate) fn detail(frame: &Frame, row: &DeadLetter, route: &Route, overridden: bool) -> String {
    let mut body = format!("<h1>Event {}</h1>", row.event_id);
    let fields: [(&str, String); 12] = [
        ("Status", row.status.clone()),
        ("Event id", row.event_id.to_string()),
        ("Sequence", row.sequence.to_string()),
        ("Event type", row.event_type.clone()),
        (
            "Aggregate",
            format!("{} {}", row.aggregate_type, row.aggregate_id),
        ),
        ("Partition key", row.partition_key.clone()),
        (
            "Destination",
            format!(
                "{}{}",
                route.destination,
                if overridden {
                    " (set by the writer)"
                } else {
                    " (configured route)"
                }
            ),
        ),
        ("Routing key / message key", route.key.clone()),
        ("Failed attempts", row.attempts.to_string()),
        ("First failed", time(row.first_failed_at)),
        ("Last failed", time(row.last_failed_at)),
        ("Last error", row.last_error.clone()),
    ];
    body.push_str("<div class=\"scroll\"><table id=\"event\">");
    for (label, value) in fields {
        let _ = write!(
            body,
            "<tr><th>{}</th><td class=\"wrap\">{}</td></tr>",
            escape(label),
            escape(&value)
        );
    }
    body.push_str("</table></div><p class=\"muted\">Errors: the dead-letter table records the number of \
        failed attempts, the first and last failure times and the last error; earlier attempts' errors \
        are not kept.</p><h2>Headers</h2>");
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&row.headers) {
        Ok(headers) if headers.is_empty() => body.push_str("<p class=\"muted\">none</p>"),
        Ok(headers) => {
            body.push_str("<div class=\"scroll\"><table id=\"headers\">");
            for (name, value) in &headers {
                let value = match value {
                    serde_json::Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                let (value, cut) = truncate(&value, MAX_PAYLOAD_SHOWN_BYTES);
                let _ = write!(
                    body,
                    "<tr><th class=\"wrap\">{}</th><td class=\"wrap\">{}{}</td></tr>",
                    escape(name),
                    escape(value),
                    if cut { "…" } else { "" }
                );
            }
            body.push_str("</table></div>");
        }
        Err(_) => {
            let (shown, _) = shown_json(&row.headers);
            let _ = write!(body, "<pre id=\"headers\">{}</pre>", escape(&shown));
        }
    }
    let (payload, note) = shown_json(&row.payload);
    let _ = write!(
        body,
        "<h2>Payload</h2>{}<pre id=\"payload\">{}</pre>",
        note.map(|n| format!("<p class=\"notice\" id=\"truncated\">{}</p>", escape(&n)))
            .unwrap_or_default(),
        escape(&payload)
    );
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/console/confirm\">{}<input type=\"hidden\" name=\"id\" value=\"{}\">\
         <div class=\"actions\"><button type=\"submit\" name=\"action\" value=\"retry\" id=\"retry\">Retry</button>\
         <button type=\"submit\" name=\"action\" value=\"purge\" class=\"danger\" id=\"purge\">Purge</button></div></form>",
        frame.csrf_input(),
        row.event_id
    );
    frame.render(&format!("Event {}", row.event_id), &body)
}

/// The confirmation step: what will happen to which events.
pub(crate) fn confirm(frame: &Frame, selection: &Selection, found: &[DeadLetter]) -> String {
    let verb = match selection.action {
        Action::Retry => "Retry (publish again)",
        Action::Purge => "Purge (delete for good)",
    };
    let mut body = format!(
        "<h1>{verb}: {} event{}?</h1><div class=\"scroll\"><table id=\"selection\"><tr><th>Event</th><th>Type</th><th>Status</th></tr>",
        selection.event_ids.len(),
        if selection.event_ids.len() == 1 {
            ""
        } else {
            "s"
        }
    );
    for id in &selection.event_ids {
        let row = found.iter().find(|row| row.event_id == *id);
        let _ = write!(
            body,
            "<tr><td class=\"wrap\">{id}</td><td class=\"wrap\">{}</td><td>{}</td></tr>",
            row.map(|r| escape(&r.event_type)).unwrap_or_default(),
            row.map_or_else(
                || "not a dead letter now (already retried or purged?)".to_owned(),
                |r| escape(&r.status)
            ),
        );
    }
    let ids: String = selection
        .event_ids
        .iter()
        .map(|id| format!("<input type=\"hidden\" name=\"id\" value=\"{id}\">"))
        .collect();
    let _ = write!(
        body,
        "</table></div><form method=\"post\" action=\"/console/actions\">{}{ids}\
         <input type=\"hidden\" name=\"action\" value=\"{}\"><div class=\"actions\">\
         <button type=\"submit\" id=\"confirm\"{}>Yes, {}</button>\
         <a href=\"/console/dead-letters\">Cancel</a></div></form>",
        frame.csrf_input(),
        selection.action.name(),
        if selection.action == Action::Purge {
            " class=\"danger\""
        } else {
            ""
        },
        selection.action.name(),
    );
    frame.render("Confirm", &body)
}

/// What an action did.
pub(crate) fn action_done(frame: &Frame, selection: &Selection, changed: u64) -> String {
    let done = match selection.action {
        Action::Retry => "queued for publishing again",
        Action::Purge => "purged",
    };
    let selected = selection.event_ids.len();
    let mut body = format!(
        "<h1>Done</h1><p id=\"result\" data-action=\"{}\" data-changed=\"{changed}\">{changed} of {selected} selected \
         event{} {done}.</p>",
        selection.action.name(),
        if selected == 1 { "" } else { "s" }
    );
    if changed < selected as u64 {
        body.push_str(
            "<p class=\"notice\">The others were no dead letters any more: retried or purged \
            already (perhaps from another tab), or published since.</p>",
        );
    }
    body.push_str("<p><a href=\"/console/dead-letters\">Back to the dead letters</a></p>");
    frame.render("Done", &body)
}

/// A page that says what went wrong.
pub(crate) fn problem(frame: &Frame, title: &str, message: &str) -> String {
    let body = format!(
        "<h1>{}</h1><p class=\"problem\" id=\"problem\">{}</p><p><a href=\"/console/dead-letters\">Back to the dead letters</a></p>",
        escape(title),
        escape(message)
    );
    frame.render(title, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str = "</pre><script>alert(1)</script><img src=x onerror=alert(2)>\"'";

    fn frame() -> Frame {
        Frame {
            nonce: "n".into(),
            csrf: "c".into(),
            sign_out: true,
        }
    }

    fn hostile_row() -> DeadLetter {
        DeadLetter {
            status: "dead-lettered".into(),
            sequence: 1,
            event_id: uuid::Uuid::now_v7(),
            aggregate_type: HOSTILE.into(),
            aggregate_id: HOSTILE.into(),
            event_type: HOSTILE.into(),
            partition_key: HOSTILE.into(),
            attempts: 3,
            last_error: HOSTILE.into(),
            first_failed_at: None,
            last_failed_at: None,
            payload: serde_json::json!({ HOSTILE: HOSTILE }).to_string(),
            headers: serde_json::json!({ HOSTILE: HOSTILE }).to_string(),
        }
    }

    fn assert_no_markup_from(html: &str) {
        for raw in ["<script>alert", "<img src=x", "</pre><script"] {
            assert!(!html.contains(raw), "{raw} unescaped in {html}");
        }
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
    }

    #[test]
    fn hostile_strings_in_every_field_are_escaped() {
        let row = hostile_row();
        let route = Route {
            destination: HOSTILE.into(),
            key: HOSTILE.into(),
        };
        assert_no_markup_from(&detail(&frame(), &row, &route, true));
        let (list, _) =
            super::super::filters::parse(Some("event_type=%3Cscript%3Ealert(1)%3C/script%3E"));
        let rows = [row.clone()];
        assert_no_markup_from(&dead_letters(
            &frame(),
            &list,
            &[HOSTILE.into()],
            Ok(&rows),
            true,
        ));
        let selection = Selection {
            action: Action::Retry,
            event_ids: vec![row.event_id],
        };
        assert_no_markup_from(&confirm(&frame(), &selection, &rows));
        assert_no_markup_from(&problem(&frame(), HOSTILE, HOSTILE));
        assert_no_markup_from(&login(&frame(), Some(HOSTILE)));
    }

    #[test]
    fn huge_payloads_are_cut() {
        let mut row = hostile_row();
        row.payload = serde_json::json!({ "blob": "x".repeat(3 * 1024 * 1024) }).to_string();
        let route = Route {
            destination: "d".into(),
            key: "k".into(),
        };
        let html = detail(&frame(), &row, &route, false);
        assert!(html.len() < 2 * MAX_PAYLOAD_SHOWN_BYTES, "{}", html.len());
        assert!(
            html.contains("Truncated: showing the first 65536 of"),
            "cut is said"
        );
    }
}
