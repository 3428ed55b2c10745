//! Secrets from files: `database.url_file`, `rabbitmq.url_file` and
//! `kafka.extra_files` name files (Docker or Kubernetes secrets) whose contents
//! replace the setting, read once at start. Trailing whitespace (the newline an
//! editor or `echo` adds) is dropped; an empty file, an unreadable one, or both
//! the value and its file set is an error naming the setting.

use std::path::Path;

use super::{ConfigError, RawConfig, invalid};

/// The contents of the secret file `path` for setting `field`.
pub(super) fn read_secret(field: &str, path: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(Path::new(path)).map_err(|error| {
        invalid(
            field,
            format!("cannot read {path}: {error}"),
            "point it at a readable file holding only the secret",
        )
    })?;
    let secret = text.trim_end();
    if secret.is_empty() {
        return Err(invalid(
            field,
            format!("{path} is empty"),
            "write the secret into the file, or unset the setting",
        ));
    }
    Ok(secret.to_owned())
}

/// `value`, or the secret in `file`; never both.
fn value_or_file(
    field: &str,
    value: Option<String>,
    file: Option<String>,
) -> Result<Option<String>, ConfigError> {
    match (value, file) {
        (Some(_), Some(_)) => Err(invalid(
            &format!("{field}_file"),
            format!("is set together with {field}"),
            format!("set either {field} or {field}_file, not both"),
        )),
        (None, Some(path)) => read_secret(&format!("{field}_file"), &path).map(Some),
        (value, None) => Ok(value),
    }
}

impl RawConfig {
    /// Replace every `*_file` setting by the secret its file holds.
    pub(super) fn read_secret_files(mut self) -> Result<RawConfig, ConfigError> {
        self.database.url = value_or_file(
            "database.url",
            self.database.url.take(),
            self.database.url_file.take(),
        )?;
        if let Some(rabbitmq) = self.rabbitmq.as_mut() {
            rabbitmq.url = value_or_file(
                "rabbitmq.url",
                rabbitmq.url.take(),
                rabbitmq.url_file.take(),
            )?;
        }
        if let Some(kafka) = self.kafka.as_mut() {
            for (key, path) in std::mem::take(&mut kafka.extra_files) {
                let field = format!("kafka.extra_files.{key}");
                if kafka.extra.contains_key(&key) {
                    return Err(invalid(
                        &field,
                        format!("is set together with kafka.extra.{key}"),
                        "set the value in [kafka.extra] or its file in [kafka.extra_files], not both",
                    ));
                }
                let secret = read_secret(&field, &path)?;
                kafka.extra.insert(key, secret);
            }
        }
        Ok(self)
    }

    /// The database URL, from `database.url` or the file `database.url_file` names.
    pub fn database_url(&self) -> Result<Option<String>, ConfigError> {
        value_or_file(
            "database.url",
            self.database.url.clone(),
            self.database.url_file.clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::{RawConfig, RawDatabase, RawKafka};

    fn file(contents: &str) -> (std::path::PathBuf, String) {
        let path = std::env::temp_dir().join(format!(
            "outbox-relay-secret-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&path, contents).unwrap();
        let name = path.display().to_string();
        (path, name)
    }

    #[test]
    fn a_url_file_replaces_the_url_without_its_newline() {
        let (path, name) = file("postgres://relay:s3cret@db/app\n");
        let raw = RawConfig {
            database: RawDatabase {
                url_file: Some(name),
                ..Default::default()
            },
            ..Default::default()
        };
        let raw = raw.read_secret_files().unwrap();
        assert_eq!(
            raw.database.url.as_deref(),
            Some("postgres://relay:s3cret@db/app")
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_value_and_its_file_together_are_refused() {
        let raw = RawConfig {
            database: RawDatabase {
                url: Some("postgres://db/app".into()),
                url_file: Some("/nonexistent".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let error = raw.read_secret_files().unwrap_err();
        assert_eq!(error.field, "database.url_file");
        assert!(error.fix.contains("not both"), "{error}");
    }

    #[test]
    fn a_missing_or_empty_secret_file_names_the_setting_and_the_path() {
        let raw = RawConfig {
            database: RawDatabase {
                url_file: Some("/nonexistent/secret".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let error = raw.read_secret_files().unwrap_err();
        assert_eq!(error.field, "database.url_file");
        assert!(error.problem.contains("/nonexistent/secret"), "{error}");

        let (path, name) = file(" \n");
        let mut extra_files = std::collections::BTreeMap::new();
        extra_files.insert("sasl.password".to_owned(), name);
        let raw = RawConfig {
            kafka: Some(RawKafka {
                extra_files,
                ..Default::default()
            }),
            ..Default::default()
        };
        let error = raw.read_secret_files().unwrap_err();
        assert_eq!(error.field, "kafka.extra_files.sasl.password");
        assert!(error.problem.contains("empty"), "{error}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_kafka_extra_file_becomes_the_librdkafka_setting() {
        let (path, name) = file("kafka-pass\n");
        let mut extra_files = std::collections::BTreeMap::new();
        extra_files.insert("sasl.password".to_owned(), name);
        let raw = RawConfig {
            kafka: Some(RawKafka {
                extra_files,
                ..Default::default()
            }),
            ..Default::default()
        };
        let kafka = raw.read_secret_files().unwrap().kafka.unwrap();
        assert_eq!(
            kafka.extra.get("sasl.password").map(String::as_str),
            Some("kafka-pass")
        );
        assert!(kafka.extra_files.is_empty());
        let _ = std::fs::remove_file(path);
    }
}
