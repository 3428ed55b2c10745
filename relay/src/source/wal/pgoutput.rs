//! The pgoutput messages the WAL source decodes itself: Relation and Insert
//! (protocol version 1, text format), and the mapping of an outbox row to an
//! [`OutboxEvent`] by the Relation message's column names.
//!
//! Begin, Commit and logical decoding messages are parsed by the replication
//! client; Type, Origin, Update, Delete and Truncate are not needed (the
//! publication publishes inserts only) and are skipped.

use chrono::{DateTime, Datelike, NaiveDateTime, TimeDelta, Utc};
use outbox_core::{EventId, Headers};

use crate::event::OutboxEvent;

/// Tag of a Relation message.
pub(super) const RELATION: u8 = b'R';
/// Tag of an Insert message.
pub(super) const INSERT: u8 = b'I';

/// A table as described by a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Relation {
    /// The relation's OID: Insert messages refer to it.
    pub(super) oid: u32,
    /// Schema name.
    pub(super) namespace: String,
    /// Table name.
    pub(super) name: String,
    /// Column names in tuple order.
    pub(super) columns: Vec<String>,
}

/// One column of a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Value<'a> {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value (never in an insert).
    Unchanged,
    /// Text-format value.
    Text(&'a [u8]),
    /// Binary-format value (only with `binary 'true'`, which the source never asks for).
    Binary(&'a [u8]),
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.data.len() < n {
            return Err(format!("truncated message: {what}"));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    fn i16(&mut self, what: &str) -> Result<i16, String> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self, what: &str) -> Result<i32, String> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn cstr(&mut self, what: &str) -> Result<String, String> {
        let end = self
            .data
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| format!("truncated message: {what} has no terminator"))?;
        let text = std::str::from_utf8(&self.data[..end])
            .map_err(|_| format!("{what} is not UTF-8"))?
            .to_owned();
        self.data = &self.data[end + 1..];
        Ok(text)
    }
}

/// Parse a Relation message (`data` starts with the `R` tag).
pub(super) fn parse_relation(data: &[u8]) -> Result<Relation, String> {
    let mut r = Reader { data };
    if r.u8("tag")? != RELATION {
        return Err("not a Relation message".to_owned());
    }
    let oid = r.u32("relation oid")?;
    let namespace = r.cstr("namespace")?;
    let name = r.cstr("relation name")?;
    let _replica_identity = r.u8("replica identity")?;
    let count = r.i16("column count")?;
    let count = usize::try_from(count).map_err(|_| format!("negative column count {count}"))?;
    let mut columns = Vec::with_capacity(count);
    for _ in 0..count {
        let _flags = r.u8("column flags")?;
        columns.push(r.cstr("column name")?);
        let _type_oid = r.u32("column type")?;
        let _type_modifier = r.i32("column type modifier")?;
    }
    Ok(Relation {
        // pgoutput sends an empty namespace for pg_catalog.
        namespace: if namespace.is_empty() {
            "pg_catalog".to_owned()
        } else {
            namespace
        },
        oid,
        name,
        columns,
    })
}

/// Parse an Insert message (`data` starts with the `I` tag): the relation OID
/// and the new tuple's values in column order, borrowed from `data`.
pub(super) fn parse_insert(data: &[u8]) -> Result<(u32, Vec<Value<'_>>), String> {
    let mut r = Reader { data };
    if r.u8("tag")? != INSERT {
        return Err("not an Insert message".to_owned());
    }
    let oid = r.u32("relation oid")?;
    let kind = r.u8("tuple kind")?;
    if kind != b'N' {
        return Err(format!(
            "unexpected tuple kind {:?} in Insert",
            kind as char
        ));
    }
    let count = r.i16("column count")?;
    let count = usize::try_from(count).map_err(|_| format!("negative column count {count}"))?;
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        let value = match r.u8("column kind")? {
            b'n' => Value::Null,
            b'u' => Value::Unchanged,
            kind @ (b't' | b'b') => {
                let len = r.i32("value length")?;
                let len = usize::try_from(len).map_err(|_| format!("negative length {len}"))?;
                let bytes = r.take(len, "value")?;
                if kind == b't' {
                    Value::Text(bytes)
                } else {
                    Value::Binary(bytes)
                }
            }
            other => return Err(format!("unknown column kind {:?}", other as char)),
        };
        values.push(value);
    }
    Ok((oid, values))
}

/// Where each outbox field is in a tuple of the outbox table, found by column
/// name in its Relation message (never by position: columns can be added, and
/// a table rewritten by a migration can order them differently).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OutboxColumns {
    sequence: usize,
    event_id: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    event_type: usize,
    partition_key: usize,
    payload: usize,
    created_at: usize,
    destination: Option<usize>,
    headers: Option<usize>,
    attempts: Option<usize>,
}

impl OutboxColumns {
    /// Map the columns of `relation`; fails naming the first required column that is missing
    /// (for example when a publication's column list leaves it out).
    pub(super) fn new(relation: &Relation) -> Result<Self, String> {
        let find = |name: &str| relation.columns.iter().position(|c| c == name);
        let require = |name: &'static str| {
            find(name).ok_or_else(|| {
                format!(
                    "the outbox table as published has no column {name:?}: the publication must publish every column \
                     (drop its column list: ALTER PUBLICATION … SET TABLE {}.{} )",
                    relation.namespace, relation.name
                )
            })
        };
        Ok(OutboxColumns {
            sequence: require("sequence")?,
            event_id: require("event_id")?,
            aggregate_type: require("aggregate_type")?,
            aggregate_id: require("aggregate_id")?,
            event_type: require("event_type")?,
            partition_key: require("partition_key")?,
            payload: require("payload")?,
            created_at: require("created_at")?,
            destination: find("destination"),
            headers: find("headers"),
            attempts: find("attempts"),
        })
    }

    /// The event in an inserted outbox row, and why it cannot be published when
    /// a value is one no event can carry (`created_at` infinite or beyond year
    /// 262142, written by another writer): such a row is dead-lettered as it is.
    /// The event's `created_at` is then a placeholder, never published.
    pub(super) fn event(
        &self,
        values: &[Value<'_>],
    ) -> Result<(OutboxEvent, Option<String>), String> {
        let text = |index: usize, name: &str| -> Result<Option<&str>, String> {
            match values.get(index) {
                Some(Value::Text(bytes)) => std::str::from_utf8(bytes)
                    .map(Some)
                    .map_err(|_| format!("column {name} is not UTF-8")),
                Some(Value::Null) => Ok(None),
                Some(Value::Unchanged) => Err(format!("column {name} is an unchanged TOAST value")),
                Some(Value::Binary(_)) => Err(format!("column {name} is in binary format")),
                None => Err(format!(
                    "the row has {} columns, column {name} is number {}",
                    values.len(),
                    index + 1
                )),
            }
        };
        let required = |index: usize, name: &str| -> Result<&str, String> {
            text(index, name)?.ok_or_else(|| format!("column {name} is null"))
        };
        let sequence = required(self.sequence, "sequence")?;
        let sequence: i64 = sequence
            .parse()
            .map_err(|_| format!("sequence {sequence:?} is not an integer"))?;
        let event_id = required(self.event_id, "event_id")?;
        let event_id: EventId = event_id
            .parse()
            .map_err(|_| format!("event_id {event_id:?} is not a UUID"))?;
        let created_at_text = required(self.created_at, "created_at")?;
        let (created_at, undecodable) = match parse_timestamptz(created_at_text) {
            Ok(created_at) => (created_at, None),
            Err(_) => (
                DateTime::<Utc>::UNIX_EPOCH,
                Some(crate::source::row::unpublishable_created_at(
                    created_at_text,
                )),
            ),
        };
        let headers = match self.headers {
            Some(index) => match text(index, "headers")? {
                Some(json) => parse_headers(json)?,
                None => Headers::new(),
            },
            None => Headers::new(),
        };
        let destination = match self.destination {
            Some(index) => text(index, "destination")?.map(str::to_owned),
            None => None,
        };
        let attempts = match self.attempts {
            Some(index) => match text(index, "attempts")? {
                Some(n) => n
                    .parse()
                    .map_err(|_| format!("attempts {n:?} is not an integer"))?,
                None => 0,
            },
            None => 0,
        };
        let event = OutboxEvent {
            sequence,
            event_id,
            aggregate_type: required(self.aggregate_type, "aggregate_type")?.to_owned(),
            aggregate_id: required(self.aggregate_id, "aggregate_id")?.to_owned(),
            event_type: required(self.event_type, "event_type")?.to_owned(),
            partition_key: required(self.partition_key, "partition_key")?.to_owned(),
            destination,
            payload: required(self.payload, "payload")?.as_bytes().to_vec(),
            headers,
            created_at,
            attempts,
        };
        Ok((event, undecodable))
    }
}

/// Header values that are not strings (rows written by other tools) are carried
/// as their JSON text, as the polling source does.
fn parse_headers(json: &str) -> Result<Headers, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("headers are not JSON: {e}"))?;
    Ok(crate::source::row::headers_from_json(value))
}

/// Parse a `timestamptz` in the text form of a session with `DateStyle = ISO`:
/// `2026-11-23 10:30:15.123456+00` (fraction and offset minutes optional; a
/// ` BC` suffix for years before 1). `infinity`, `-infinity` and years beyond
/// chrono's range (262142) are errors: no event time can carry them.
pub(super) fn parse_timestamptz(text: &str) -> Result<DateTime<Utc>, String> {
    let bad = || format!("created_at {text:?} is not an ISO timestamp with time zone");
    let (text, before_christ) = match text.strip_suffix(" BC") {
        Some(text) => (text, true),
        None => (text, false),
    };
    // The offset starts at the last '+' or '-' after the date part.
    let split = text
        .get(10..)
        .and_then(|rest| rest.rfind(['+', '-']))
        .map(|i| i + 10)
        .ok_or_else(bad)?;
    let (local, offset) = text.split_at(split);
    let mut local =
        NaiveDateTime::parse_from_str(local, "%Y-%m-%d %H:%M:%S%.f").map_err(|_| bad())?;
    if before_christ {
        // Year 1 BC is year 0 of the proleptic Gregorian calendar PostgreSQL and chrono use.
        local = local.with_year(1 - local.year()).ok_or_else(bad)?;
    }
    let sign: i64 = if offset.starts_with('-') { -1 } else { 1 };
    let mut offset_seconds = 0_i64;
    for (i, part) in offset[1..].split(':').enumerate() {
        let n: i64 = part.parse().map_err(|_| bad())?;
        let unit = match i {
            0 => 3600,
            1 => 60,
            2 => 1,
            _ => return Err(bad()),
        };
        offset_seconds += n * unit;
    }
    Ok((local - TimeDelta::seconds(sign * offset_seconds)).and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn relation_message(oid: u32, namespace: &str, name: &str, columns: &[&str]) -> Vec<u8> {
        let mut m = vec![RELATION];
        m.extend_from_slice(&oid.to_be_bytes());
        for s in [namespace, name] {
            m.extend_from_slice(s.as_bytes());
            m.push(0);
        }
        m.push(b'd');
        m.extend_from_slice(&(columns.len() as i16).to_be_bytes());
        for c in columns {
            m.push(0);
            m.extend_from_slice(c.as_bytes());
            m.push(0);
            m.extend_from_slice(&25_u32.to_be_bytes());
            m.extend_from_slice(&(-1_i32).to_be_bytes());
        }
        m
    }

    fn insert_message(oid: u32, values: &[Option<&str>]) -> Vec<u8> {
        let mut m = vec![INSERT];
        m.extend_from_slice(&oid.to_be_bytes());
        m.push(b'N');
        m.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                None => m.push(b'n'),
                Some(text) => {
                    m.push(b't');
                    m.extend_from_slice(&(text.len() as i32).to_be_bytes());
                    m.extend_from_slice(text.as_bytes());
                }
            }
        }
        m
    }

    #[test]
    fn columns_are_mapped_by_name_not_position() {
        // Columns in an unusual order, with extra ones the source does not read.
        let columns = [
            "payload",
            "extra",
            "created_at",
            "event_type",
            "sequence",
            "headers",
            "aggregate_id",
            "partition_key",
            "event_id",
            "aggregate_type",
            "destination",
            "attempts",
        ];
        let relation = parse_relation(&relation_message(7, "s", "outbox", &columns)).unwrap();
        assert_eq!(relation.oid, 7);
        assert_eq!(relation.namespace, "s");
        assert_eq!(relation.name, "outbox");
        let map = OutboxColumns::new(&relation).unwrap();
        let id = EventId::new();
        let values = [
            Some(r#"{"a": 1}"#),
            Some("ignored"),
            Some("2026-11-23 10:30:15.123456+00"),
            Some("order.placed"),
            Some("42"),
            Some(r#"{"n": 5, "x-tenant": "acme"}"#),
            Some("o-1"),
            Some("customer:7"),
            Some(&id.to_string()),
            Some("order"),
            None,
            Some("2"),
        ];
        let message = insert_message(7, &values);
        let (oid, tuple) = parse_insert(&message).unwrap();
        assert_eq!(oid, 7);
        let (event, undecodable) = map.event(&tuple).unwrap();
        assert_eq!(undecodable, None);
        assert_eq!(event.sequence, 42);
        assert_eq!(event.event_id, id);
        assert_eq!(event.aggregate_type, "order");
        assert_eq!(event.aggregate_id, "o-1");
        assert_eq!(event.event_type, "order.placed");
        assert_eq!(event.partition_key, "customer:7");
        assert_eq!(event.destination, None);
        assert_eq!(event.payload, br#"{"a": 1}"#);
        assert_eq!(
            event.headers.get("x-tenant").map(String::as_str),
            Some("acme")
        );
        assert_eq!(event.headers.get("n").map(String::as_str), Some("5"));
        assert_eq!(event.attempts, 2);
        assert_eq!(
            event.created_at,
            Utc.with_ymd_and_hms(2026, 11, 23, 10, 30, 15).unwrap()
                + TimeDelta::microseconds(123_456)
        );
    }

    #[test]
    fn a_missing_required_column_is_named() {
        let relation = parse_relation(&relation_message(
            1,
            "s",
            "outbox",
            &["sequence", "event_id"],
        ))
        .unwrap();
        let err = OutboxColumns::new(&relation).unwrap_err();
        assert!(err.contains("aggregate_type"), "{err}");
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        let message = insert_message(3, &[Some("abc"), None]);
        for len in 0..message.len() {
            assert!(
                parse_insert(&message[..len]).is_err(),
                "prefix of {len} bytes"
            );
        }
        let relation = relation_message(3, "s", "outbox", &["a", "b"]);
        for len in 0..relation.len() {
            assert!(
                parse_relation(&relation[..len]).is_err(),
                "prefix of {len} bytes"
            );
        }
    }

    #[test]
    fn timestamps_in_iso_style_parse() {
        let base = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(parse_timestamptz("2026-01-02 03:04:05+00").unwrap(), base);
        assert_eq!(
            parse_timestamptz("2026-01-02 03:04:05.5+00").unwrap(),
            base + TimeDelta::milliseconds(500)
        );
        assert_eq!(
            parse_timestamptz("2026-01-02 05:34:05+02:30").unwrap(),
            base
        );
        assert_eq!(parse_timestamptz("2026-01-01 22:04:05-05").unwrap(), base);
        assert_eq!(
            parse_timestamptz("0044-03-15 12:00:00+00 BC").unwrap(),
            Utc.with_ymd_and_hms(-43, 3, 15, 12, 0, 0).unwrap()
        );
        for bad in [
            "infinity",
            "-infinity",
            "294276-12-31 23:59:59+00",
            "",
            "2026-01-02",
            "2026-01-02 03:04:05",
            "yesterday+00",
            "2026-13-02 03:04:05+00",
        ] {
            assert!(parse_timestamptz(bad).is_err(), "{bad}");
        }
    }
}
