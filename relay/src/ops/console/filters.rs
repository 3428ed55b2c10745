//! The dead-letter list's query string: filters and page, parsed strictly so a
//! malformed value is named back to the operator instead of failing the page.

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::admin::{DeadLetterFilter, DeadLetterPage};

/// Dead letters per page.
pub(crate) const PAGE_SIZE: i64 = 50;
/// Longest filter value accepted, in characters.
const MAX_FILTER_CHARS: usize = 500;
/// Highest page number accepted.
const MAX_PAGE: i64 = 100_000;

/// The list's filters as typed (to fill the form again) and as a query.
#[derive(Clone, Debug, Default)]
pub(crate) struct ListQuery {
    /// `event_type`, `aggregate_type`, `aggregate_id`, `error`, `since`, `until`, as typed.
    pub(crate) fields: Vec<(&'static str, String)>,
    /// Page number, from 1.
    pub(crate) page: i64,
    /// The page to read.
    pub(crate) query: DeadLetterPage,
}

/// The filter fields, in form order, with their labels.
pub(crate) const FIELDS: [(&str, &str); 6] = [
    ("event_type", "Event type"),
    ("aggregate_type", "Aggregate type"),
    ("aggregate_id", "Aggregate id"),
    ("error", "Error contains"),
    ("since", "Failed since (UTC)"),
    ("until", "Failed before (UTC)"),
];

impl ListQuery {
    /// The value typed for `field`, or "".
    pub(crate) fn field(&self, field: &str) -> &str {
        self.fields
            .iter()
            .find(|(name, _)| *name == field)
            .map_or("", |(_, value)| value.as_str())
    }

    /// The query-string pairs of these filters (without the page).
    pub(crate) fn filter_pairs(&self) -> Vec<(&str, &str)> {
        self.fields
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect()
    }
}

/// A time typed into a filter: RFC 3339, or `YYYY-MM-DDTHH:MM[:SS]` / `YYYY-MM-DD HH:MM[:SS]` in UTC
/// (what a `datetime-local` input sends), or a date.
fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Some(time.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%d %H:%M:%S",
    ] {
        if let Ok(time) = NaiveDateTime::parse_from_str(text, format) {
            return Some(time.and_utc());
        }
    }
    chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|time| time.and_utc())
}

/// Parse the list's query string; the problems name the field and the fix.
pub(crate) fn parse(query: Option<&str>) -> (ListQuery, Vec<String>) {
    let mut problems = Vec::new();
    let mut list = ListQuery {
        page: 1,
        ..Default::default()
    };
    let mut filter = DeadLetterFilter::default();
    let mut error_contains = None;
    let pairs = form_urlencoded::parse(query.unwrap_or("").as_bytes());
    for (key, value) in pairs {
        let value = value.trim().to_owned();
        if key == "page" {
            match value.parse::<i64>() {
                Ok(page) if (1..=MAX_PAGE).contains(&page) => list.page = page,
                _ if value.is_empty() => {}
                _ => problems.push(format!(
                    "page: {value:?} is not a page number; use 1 to {MAX_PAGE}"
                )),
            }
            continue;
        }
        let Some((name, label)) = FIELDS.iter().find(|(name, _)| *name == key) else {
            // Unknown parameters are ignored, as links may carry extra ones.
            continue;
        };
        if value.is_empty() {
            continue;
        }
        if value.chars().count() > MAX_FILTER_CHARS {
            problems.push(format!(
                "{label}: longer than {MAX_FILTER_CHARS} characters; shorten it"
            ));
            continue;
        }
        list.fields.retain(|(existing, _)| existing != name);
        list.fields.push((name, value.clone()));
        match *name {
            "event_type" => filter.event_type = Some(value),
            "aggregate_type" => filter.aggregate_type = Some(value),
            "aggregate_id" => filter.aggregate_id = Some(value),
            "error" => error_contains = Some(value),
            "since" | "until" => match parse_time(&value) {
                Some(time) if *name == "since" => filter.since = Some(time),
                Some(time) => filter.until = Some(time),
                None => problems.push(format!(
                    "{label}: {value:?} is not a time; use 2026-01-31T14:00 (UTC) or RFC 3339"
                )),
            },
            _ => {}
        }
    }
    list.query = DeadLetterPage {
        filter,
        error_contains,
        offset: (list.page - 1) * PAGE_SIZE,
        // One more than shown tells whether there is a next page.
        limit: PAGE_SIZE + 1,
    };
    (list, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_filters_and_page() {
        let (list, problems) = parse(Some(
            "event_type=order.placed&aggregate_id=%3Cb%3E&error=unroutable&since=2026-01-31T14:00&until=2026-02-01T00:00:00Z&page=3",
        ));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(list.page, 3);
        assert_eq!(list.query.offset, 2 * PAGE_SIZE);
        assert_eq!(
            list.query.filter.event_type.as_deref(),
            Some("order.placed")
        );
        assert_eq!(list.query.filter.aggregate_id.as_deref(), Some("<b>"));
        assert_eq!(list.query.error_contains.as_deref(), Some("unroutable"));
        assert_eq!(
            list.query.filter.since.map(|t| t.to_rfc3339()).as_deref(),
            Some("2026-01-31T14:00:00+00:00")
        );
        assert!(list.query.filter.until.is_some());
        assert_eq!(list.field("aggregate_id"), "<b>");
    }

    #[test]
    fn malformed_values_are_named_not_fatal() {
        let long = "x".repeat(MAX_FILTER_CHARS + 1);
        let (list, problems) = parse(Some(&format!(
            "since=yesterday&page=-1&page=abc&event_type={long}&%ZZ=1&until=9999999-99-99"
        )));
        assert_eq!(list.page, 1);
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(problems[0].contains("Failed since"), "{problems:?}");
        assert!(list.query.filter.since.is_none());
        assert!(list.query.filter.event_type.is_none());
        let (list, problems) = parse(None);
        assert!(problems.is_empty());
        assert!(list.query.filter.is_empty());
    }
}
