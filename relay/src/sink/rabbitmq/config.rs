//! The sink's settings: exchanges to declare, TLS, and the broker URL (parsed and masked).

use super::*;

/// How the RabbitMQ sink connects and publishes.
#[derive(Clone, PartialEq, Eq)]
pub struct RabbitMqConfig {
    /// `amqp://user:password@host:5672/vhost` (or `amqps://`); the password is never logged.
    pub url: String,
    /// The `app_id` property of every message, e.g. `outbox-relay`; the connection is
    /// named `outbox-relay <app_id>` in the broker's management UI.
    pub app_id: String,
    /// Bound on connecting, including the exchange declarations; also bounds each reconnect.
    pub connect_timeout: Duration,
    /// Bound on one publish, from taking a channel to the broker's confirm.
    pub publish_timeout: Duration,
    /// Exchanges declared on every (re)connect.
    pub declare_exchanges: Vec<ExchangeDeclaration>,
    /// PEM file of the CA(s) that signed the broker's certificate, for `amqps://`
    /// (`None`: the system's trust store). The broker's host name is always verified.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Largest message body (the payload) sent, in bytes; larger events are rejected
    /// permanently before the publish. Set it to the broker's `max_message_size`
    /// (default [`DEFAULT_MAX_MESSAGE_BYTES`]).
    pub max_message_bytes: usize,
    /// Events of one key published on one channel before their confirms, 1 to
    /// [`MAX_IN_FLIGHT_PER_KEY_CEILING`]; default 1 (each after its predecessor's
    /// confirm). More is safe only where no queue the key's events route to can
    /// refuse one message and take the next (`x-overflow = reject-publish` at a
    /// length limit would let a later event overtake a nacked one); see `run.rs`.
    pub max_in_flight_per_key: usize,
}

impl fmt::Debug for RabbitMqConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqConfig")
            .field("url", &mask_url(&self.url))
            .field("app_id", &self.app_id)
            .field("connect_timeout", &self.connect_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("declare_exchanges", &self.declare_exchanges)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_in_flight_per_key", &self.max_in_flight_per_key)
            .finish()
    }
}

/// An exchange the sink declares when it connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeDeclaration {
    /// Exchange name.
    pub name: String,
    /// Routing algorithm.
    pub kind: ExchangeKind,
    /// Whether the exchange survives a broker restart.
    pub durable: bool,
}

/// The routing algorithm of a declared exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeKind {
    /// Routing key equals the binding key.
    Direct,
    /// Routing key matches a binding pattern with `*` and `#`.
    Topic,
    /// Every bound queue, regardless of the routing key.
    Fanout,
    /// Message headers match the binding arguments.
    Headers,
}

impl ExchangeKind {
    pub(super) fn as_lapin(self) -> lapin::ExchangeKind {
        match self {
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Topic => lapin::ExchangeKind::Topic,
            ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeKind::Headers => lapin::ExchangeKind::Headers,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// The TLS settings of `config`: the CA file's certificates, read now so that a
/// missing or unreadable file is named at start.
pub(super) fn tls_config(config: &RabbitMqConfig) -> Result<lapin::tcp::OwnedTLSConfig, String> {
    let cert_chain = match &config.tls_ca_file {
        None => None,
        Some(path) => {
            let pem = std::fs::read_to_string(path).map_err(|error| {
                format!(
                    "cannot read rabbitmq.tls_ca_file {}: {error}; set it to the PEM file of the \
                     CA that signed the broker's certificate",
                    path.display()
                )
            })?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(format!(
                    "rabbitmq.tls_ca_file {} holds no PEM certificate; set it to the PEM file \
                     of the CA that signed the broker's certificate",
                    path.display()
                ));
            }
            Some(pem)
        }
    };
    Ok(lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain,
    })
}

/// Parse the url, keeping an IP-literal host that the url parser would replace by
/// `localhost`. Errors show `shown_url` and never the password.
pub(crate) fn parse_url(url: &str, shown_url: &str) -> Result<AMQPUri, SinkError> {
    let mut uri: AMQPUri = url.parse().map_err(|reason: String| {
        let password = password_of(url).unwrap_or_default();
        SinkError::permanent(format!(
            "invalid RabbitMQ url {shown_url}: {}; expected amqp://user:password@host:5672/vhost \
             (percent-encode special characters; the default vhost is %2f)",
            scrub(&reason, url, &password)
        ))
    })?;
    // amq-protocol-uri 10.6 reads the host with `Url::domain`, which is `None` for an IPv6
    // literal (`[::1]`), and then silently falls back to `localhost`.
    if let Some(host) = literal_ip_host(url) {
        uri.authority.host = host;
    }
    Ok(uri)
}

/// The `host` part of `scheme://userinfo@host:port/…` if it is an IP address.
pub(super) fn literal_ip_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host_port)| host_port);
    let host = if let Some(bracketed) = host_port.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    host.parse::<IpAddr>().ok().map(|ip| ip.to_string())
}

/// The raw (still percent-encoded) password of a url, if it has one.
pub(super) fn password_of(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (userinfo, _) = rest.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    Some(password.to_owned())
}

/// The url with its password replaced by `***`. Masks too much rather than too little:
/// everything between the first `:` of the userinfo and the last `@` of the url.
pub fn mask_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}{user}:***@{host}"),
            None => format!("{scheme}{userinfo}@{host}"),
        },
        None => url.to_owned(),
    }
}

/// Remove the url and the password from a library's message. Passwords shorter than
/// four characters are left alone: masking them would garble the message.
pub(super) fn scrub(text: &str, url: &str, password: &str) -> String {
    let mut text = text.replace(url, &mask_url(url));
    if password.len() >= 4 {
        text = text.replace(password, "***");
    }
    text
}
