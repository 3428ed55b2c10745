//! Retry and purge from the console: the selection a form sends, and the one
//! call into [`crate::admin`] that the CLI's `dead-letters retry|purge` make too.
//! Every action is logged with what, when and from where; never payloads or tokens.

use std::net::SocketAddr;

use outbox_core::SchemaName;
use sqlx::PgPool;

use crate::admin::{self, DeadLetterFilter};

/// Most events one form may select.
pub(crate) const MAX_SELECTED: usize = 1_000;

/// What to do with the selected events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Publish again (`dead-letters retry`).
    Retry,
    /// Delete for good (`dead-letters purge`).
    Purge,
}

impl Action {
    /// `retry` or `purge`, as in forms and logs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Action::Retry => "retry",
            Action::Purge => "purge",
        }
    }
}

/// A validated form: the action, the distinct event ids, and the form's CSRF token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Selection {
    /// What to do.
    pub(crate) action: Action,
    /// Which events, in the order selected, without repeats.
    pub(crate) event_ids: Vec<uuid::Uuid>,
}

/// The decoded fields of an `application/x-www-form-urlencoded` body.
pub(crate) fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

/// The first value of `name` in `fields`.
pub(crate) fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// The action and the event ids (`id` fields) of a form, or what is wrong with it.
pub(crate) fn parse_selection(fields: &[(String, String)]) -> Result<Selection, String> {
    let action = match field(fields, "action") {
        Some("retry") => Action::Retry,
        Some("purge") => Action::Purge,
        _ => return Err("choose retry or purge".to_owned()),
    };
    let mut event_ids = Vec::new();
    for (key, value) in fields {
        if key != "id" {
            continue;
        }
        let id = uuid::Uuid::parse_str(value.trim())
            .map_err(|_| format!("{value:?} is not an event id"))?;
        if !event_ids.contains(&id) {
            event_ids.push(id);
        }
        if event_ids.len() > MAX_SELECTED {
            return Err(format!(
                "more than {MAX_SELECTED} events selected; narrow the filters and act in parts"
            ));
        }
    }
    if event_ids.is_empty() {
        return Err("no event selected; tick at least one".to_owned());
    }
    Ok(Selection { action, event_ids })
}

/// Apply `selection` with the CLI's code and log it; returns how many events changed
/// (fewer than selected when others were retried or purged meanwhile).
pub(crate) async fn apply(
    pool: &PgPool,
    schema: &SchemaName,
    selection: &Selection,
    remote: SocketAddr,
) -> crate::Result<u64> {
    // Only the ids: never "everything", whatever the form says.
    let filter = DeadLetterFilter {
        event_ids: selection.event_ids.clone(),
        ..Default::default()
    };
    let ids = selection
        .event_ids
        .iter()
        .map(uuid::Uuid::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let at = chrono::Utc::now().to_rfc3339();
    let result = match selection.action {
        Action::Retry => admin::retry_dead_letters(pool, schema, &filter).await,
        Action::Purge => admin::purge_dead_letters(pool, schema, &filter).await,
    };
    match &result {
        Ok(changed) => tracing::info!(
            action = selection.action.name(),
            selected = selection.event_ids.len(),
            changed,
            event_ids = %ids,
            %remote,
            %at,
            %schema,
            "console action"
        ),
        Err(error) => tracing::warn!(
            action = selection.action.name(),
            selected = selection.event_ids.len(),
            event_ids = %ids,
            %remote,
            %at,
            %schema,
            %error,
            "console action failed"
        ),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(body: &str) -> Vec<(String, String)> {
        form_fields(body.as_bytes())
    }

    #[test]
    fn selection_needs_an_action_and_valid_ids() {
        let id = uuid::Uuid::now_v7();
        let selection = parse_selection(&fields(&format!("action=retry&id={id}&id={id}&csrf=x")));
        assert_eq!(
            selection,
            Ok(Selection {
                action: Action::Retry,
                event_ids: vec![id]
            })
        );
        assert!(parse_selection(&fields(&format!("action=drop&id={id}"))).is_err());
        assert!(parse_selection(&fields("action=purge")).is_err());
        let bad = parse_selection(&fields("action=purge&id=%3Cscript%3E")).unwrap_err();
        assert!(bad.contains("not an event id"), "{bad}");
        let many: String = (0..=MAX_SELECTED)
            .map(|_| format!("&id={}", uuid::Uuid::new_v4()))
            .collect();
        assert!(parse_selection(&fields(&format!("action=retry{many}"))).is_err());
    }
}
