//! The dead-letter console: server-rendered pages under `/console` of the ops
//! endpoint to see the outbox's state, inspect dead letters, and retry or purge
//! them (with a confirmation step), using the same [`crate::admin`] functions as
//! the CLI's `dead-letters` commands.
//!
//! Off unless `[console] enabled = true`. Requests need the bearer token
//! ([`auth`]); POSTs also need the same origin and the form's CSRF token. Pages
//! are plain HTML with one inline script (select all) and inline style, allowed
//! by a per-response CSP nonce; no external assets. Every action is logged with
//! the action, the event ids, the time and the remote address; payloads and the
//! token never are.

mod actions;
mod auth;
mod filters;
mod html;
mod pages;
mod rate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use outbox_core::SchemaName;
use sqlx::PgPool;

use crate::admin::{self, DeadLetterFilter};
use crate::config::{ConfigError, ConsoleConfig, ConsoleToken};
use crate::event::OutboxEvent;
use crate::route::Router;
use crate::stats::RelayStats;

use auth::{Access, Auth, Denied};
use pages::Frame;

/// The console's state, shared by its handlers.
pub struct Console {
    pool: PgPool,
    schema: SchemaName,
    stats: Arc<RelayStats>,
    router: Router,
    auth: Auth,
    rate: rate::PublishRate,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("schema", &self.schema)
            .field("token", &self.auth.has_token())
            .finish_non_exhaustive()
    }
}

/// Read the token (from the configuration or its file).
fn read_token(config: &ConsoleConfig) -> Result<Option<String>, ConfigError> {
    let path = match &config.token {
        None => return Ok(None),
        Some(ConsoleToken::Value(token)) => return Ok(Some(token.clone())),
        Some(ConsoleToken::File(path)) => path,
    };
    let problem = |problem: String| {
        ConfigError {
        field: "console.token_file".to_owned(),
        problem,
        fix: "point it at a readable file holding the token (e.g. the output of `openssl rand -hex 32`)"
            .to_owned(),
    }
    };
    let text = std::fs::read_to_string(path)
        .map_err(|error| problem(format!("cannot read {}: {error}", path.display())))?;
    let token = text.trim();
    if token.chars().count() < crate::config::MIN_CONSOLE_TOKEN_CHARS {
        return Err(problem(format!(
            "{} holds fewer than {} characters",
            path.display(),
            crate::config::MIN_CONSOLE_TOKEN_CHARS
        )));
    }
    Ok(Some(token.to_owned()))
}

impl Console {
    /// The console for `config`, reading from `pool` and `schema`, showing `stats`,
    /// and `router` to show an event's destination. Fails if the token file cannot be read.
    pub fn new(
        config: &ConsoleConfig,
        pool: PgPool,
        schema: SchemaName,
        stats: Arc<RelayStats>,
        router: Router,
    ) -> Result<Self, ConfigError> {
        let token = read_token(config)?;
        let rate = rate::PublishRate::new(stats.published.load(Ordering::Relaxed));
        Ok(Console {
            pool,
            schema,
            stats,
            router,
            auth: Auth::new(token),
            rate,
        })
    }

    /// The console's routes, to merge into the ops endpoint's router (which must be
    /// served with `into_make_service_with_connect_info::<SocketAddr>`).
    pub fn routes(self) -> axum::Router {
        axum::Router::new()
            .route("/console", get(overview))
            .route("/console/", get(overview))
            .route("/console/login", get(login_form).post(login))
            .route("/console/logout", post(logout))
            .route("/console/dead-letters", get(dead_letters))
            .route("/console/dead-letters/{id}", get(detail))
            .route("/console/confirm", post(confirm))
            .route("/console/actions", post(act))
            // Only the console's own paths: the ops endpoint's other 404s stay as they were.
            .route("/console/{*rest}", get(not_found).post(not_found))
            .with_state(Arc::new(self))
    }

    fn frame(&self, access: Option<Access>) -> Frame {
        Frame {
            nonce: auth::random_hex(),
            csrf: self.auth.csrf().to_owned(),
            sign_out: access == Some(Access::Session),
        }
    }
}

type Shared = State<Arc<Console>>;
/// A form's decoded fields.
type Fields = Vec<(String, String)>;

/// An HTML response with the console's security headers.
fn html(status: StatusCode, frame: &Frame, body: String) -> Response {
    let csp = format!(
        "default-src 'none'; script-src 'nonce-{0}'; style-src 'nonce-{0}'; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'",
        frame.nonce
    );
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(csp) = HeaderValue::from_str(&csp) {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        // Not no-referrer: with it browsers send `Origin: null` on same-origin form posts.
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

fn redirect(to: &'static str, cookie: Option<String>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    if let Some(cookie) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// The request's access, or the response that turns it away.
fn authorize(
    console: &Console,
    headers: &HeaderMap,
    remote: SocketAddr,
) -> Result<Access, Box<Response>> {
    match console.auth.check(headers) {
        Ok(access) => Ok(access),
        Err(denied) => {
            let frame = console.frame(None);
            let (status, message) = match denied {
                Denied::NoCredentials => (StatusCode::UNAUTHORIZED, None),
                Denied::WrongCredentials => {
                    tracing::warn!(%remote, "console request with a wrong token or session");
                    (
                        StatusCode::UNAUTHORIZED,
                        Some(
                            "The token or session is not valid (the relay may have restarted); sign in again.",
                        ),
                    )
                }
                Denied::ForeignHost => {
                    tracing::warn!(%remote, "console request for a non-loopback host refused");
                    return Err(Box::new(html(
                        StatusCode::FORBIDDEN,
                        &frame,
                        pages::problem(
                            &frame,
                            "Forbidden",
                            "Without a console token the console answers only to localhost, 127.0.0.1 or [::1].",
                        ),
                    )));
                }
            };
            let mut response = html(status, &frame, pages::login(&frame, message));
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"outbox-relay console\""),
            );
            Err(Box::new(response))
        }
    }
}

async fn not_found(State(console): Shared) -> Response {
    let frame = console.frame(None);
    html(
        StatusCode::NOT_FOUND,
        &frame,
        pages::problem(&frame, "Not found", "There is no such console page."),
    )
}

async fn login_form(State(console): Shared, headers: HeaderMap) -> Response {
    if !console.auth.has_token() || console.auth.check(&headers).is_ok() {
        return redirect("/console", None);
    }
    let frame = console.frame(None);
    html(StatusCode::OK, &frame, pages::login(&frame, None))
}

async fn login(
    State(console): Shared,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let frame = console.frame(None);
    if !console.auth.has_token() {
        return redirect("/console", None);
    }
    if console
        .auth
        .check_post(Access::Bearer, &headers, None)
        .is_err()
    {
        return html(
            StatusCode::FORBIDDEN,
            &frame,
            pages::problem(&frame, "Forbidden", "The sign-in came from another site."),
        );
    }
    let fields = actions::form_fields(&body);
    let token = actions::field(&fields, "token").unwrap_or("");
    if console.auth.token_matches(token.trim()) {
        tracing::info!(%remote, "console sign-in");
        redirect("/console", Some(console.auth.session_cookie()))
    } else {
        tracing::warn!(%remote, "console sign-in with a wrong token");
        html(
            StatusCode::UNAUTHORIZED,
            &frame,
            pages::login(&frame, Some("Wrong token.")),
        )
    }
}

async fn logout(
    State(console): Shared,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let access = match authorize(&console, &headers, remote) {
        Ok(access) => access,
        Err(response) => return *response,
    };
    let fields = actions::form_fields(&body);
    if let Err(problem) = console
        .auth
        .check_post(access, &headers, actions::field(&fields, "csrf"))
    {
        let frame = console.frame(Some(access));
        return html(
            StatusCode::FORBIDDEN,
            &frame,
            pages::problem(&frame, "Forbidden", problem),
        );
    }
    redirect("/console/login", Some(Auth::cleared_cookie()))
}

async fn overview(
    State(console): Shared,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let access = match authorize(&console, &headers, remote) {
        Ok(access) => access,
        Err(response) => return *response,
    };
    let stats = &console.stats;
    let published = stats.published.load(Ordering::Relaxed);
    let data = pages::Overview {
        status: admin::status(&console.pool, &console.schema)
            .await
            .map_err(|error| error.to_string()),
        breaker: stats.breaker(),
        started: stats.started.load(Ordering::Relaxed),
        database_reachable: stats.database_reachable.load(Ordering::Relaxed),
        wal: stats.wal.active.load(Ordering::Relaxed),
        wal_leader: stats.wal.leader.load(Ordering::Relaxed),
        wal_lag_bytes: stats.wal.lag_bytes.load(Ordering::Relaxed),
        published,
        dead_lettered_since_start: stats.dead_lettered.load(Ordering::Relaxed),
        rate: console.rate.observe(published),
    };
    let frame = console.frame(Some(access));
    html(StatusCode::OK, &frame, pages::overview(&frame, &data))
}

async fn dead_letters(
    State(console): Shared,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let access = match authorize(&console, &headers, remote) {
        Ok(access) => access,
        Err(response) => return *response,
    };
    let frame = console.frame(Some(access));
    let (list, problems) = filters::parse(uri.query());
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    let rows = admin::list_dead_letters_page(&console.pool, &console.schema, &list.query).await;
    let body = match &rows {
        Ok(rows) => {
            let shown = rows.len().min(filters::PAGE_SIZE as usize);
            let has_next = rows.len() > shown;
            pages::dead_letters(&frame, &list, &problems, Ok(&rows[..shown]), has_next)
        }
        Err(error) => {
            let error = error.to_string();
            return html(
                StatusCode::SERVICE_UNAVAILABLE,
                &frame,
                pages::dead_letters(&frame, &list, &problems, Err(&error), false),
            );
        }
    };
    html(status, &frame, body)
}

async fn detail(
    State(console): Shared,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let access = match authorize(&console, &headers, remote) {
        Ok(access) => access,
        Err(response) => return *response,
    };
    let frame = console.frame(Some(access));
    let Ok(event_id) = uuid::Uuid::parse_str(&id) else {
        return html(
            StatusCode::NOT_FOUND,
            &frame,
            pages::problem(&frame, "Not found", &format!("{id:?} is not an event id.")),
        );
    };
    let filter = DeadLetterFilter {
        event_ids: vec![event_id],
        ..Default::default()
    };
    let found = admin::list_dead_letters(&console.pool, &console.schema, &filter, 1).await;
    let row = match found.map(|rows| rows.into_iter().next()) {
        Ok(Some(row)) => row,
        Ok(None) => {
            return html(
                StatusCode::NOT_FOUND,
                &frame,
                pages::problem(
                    &frame,
                    "Not found",
                    &format!(
                        "No dead-lettered or blocked event {event_id} (retried, purged, or never failed)."
                    ),
                ),
            );
        }
        Err(error) => return database_problem(&frame, &error),
    };
    let destination =
        match admin::dead_letter_destination(&console.pool, &console.schema, event_id).await {
            Ok(destination) => destination,
            Err(error) => return database_problem(&frame, &error),
        };
    let overridden = destination.is_some();
    let event = OutboxEvent {
        sequence: row.sequence,
        event_id: outbox_core::EventId::from_uuid(row.event_id),
        aggregate_type: row.aggregate_type.clone(),
        aggregate_id: row.aggregate_id.clone(),
        event_type: row.event_type.clone(),
        partition_key: row.partition_key.clone(),
        destination,
        payload: Vec::new(),
        headers: Default::default(),
        created_at: chrono::Utc::now(),
        attempts: row.attempts,
    };
    let route = console.router.route(&event);
    html(
        StatusCode::OK,
        &frame,
        pages::detail(&frame, &row, &route, overridden),
    )
}

fn database_problem(frame: &Frame, error: &crate::RelayError) -> Response {
    html(
        StatusCode::SERVICE_UNAVAILABLE,
        frame,
        pages::problem(frame, "Database error", &error.to_string()),
    )
}

/// A POST's access and fields, after the token, origin and CSRF checks.
fn checked_post(
    console: &Console,
    headers: &HeaderMap,
    remote: SocketAddr,
    body: &[u8],
) -> Result<(Access, Fields), Box<Response>> {
    let access = authorize(console, headers, remote)?;
    let fields = actions::form_fields(body);
    if let Err(problem) = console
        .auth
        .check_post(access, headers, actions::field(&fields, "csrf"))
    {
        tracing::warn!(%remote, problem, "console POST refused");
        let frame = console.frame(Some(access));
        return Err(Box::new(html(
            StatusCode::FORBIDDEN,
            &frame,
            pages::problem(&frame, "Forbidden", problem),
        )));
    }
    Ok((access, fields))
}

async fn confirm(
    State(console): Shared,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (access, fields) = match checked_post(&console, &headers, remote, &body) {
        Ok(checked) => checked,
        Err(response) => return *response,
    };
    let frame = console.frame(Some(access));
    let selection = match actions::parse_selection(&fields) {
        Ok(selection) => selection,
        Err(problem) => {
            return html(
                StatusCode::BAD_REQUEST,
                &frame,
                pages::problem(&frame, "Nothing to do", &problem),
            );
        }
    };
    let filter = DeadLetterFilter {
        event_ids: selection.event_ids.clone(),
        ..Default::default()
    };
    let limit = selection.event_ids.len() as i64;
    match admin::list_dead_letters(&console.pool, &console.schema, &filter, limit).await {
        Ok(found) => html(
            StatusCode::OK,
            &frame,
            pages::confirm(&frame, &selection, &found),
        ),
        Err(error) => database_problem(&frame, &error),
    }
}

async fn act(
    State(console): Shared,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (access, fields) = match checked_post(&console, &headers, remote, &body) {
        Ok(checked) => checked,
        Err(response) => return *response,
    };
    let frame = console.frame(Some(access));
    let selection = match actions::parse_selection(&fields) {
        Ok(selection) => selection,
        Err(problem) => {
            return html(
                StatusCode::BAD_REQUEST,
                &frame,
                pages::problem(&frame, "Nothing to do", &problem),
            );
        }
    };
    match actions::apply(&console.pool, &console.schema, &selection, remote).await {
        Ok(changed) => html(
            StatusCode::OK,
            &frame,
            pages::action_done(&frame, &selection, changed),
        ),
        Err(error) => database_problem(&frame, &error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_file_is_read_trimmed_and_checked() {
        let dir = std::env::temp_dir().join(format!("console-token-{}", uuid::Uuid::new_v4()));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("token");
        let config = ConsoleConfig {
            token: Some(ConsoleToken::File(file.clone())),
        };
        let missing = read_token(&config).unwrap_err();
        assert_eq!(missing.field, "console.token_file");
        assert!(missing.problem.contains("cannot read"), "{missing}");
        let _ = std::fs::write(&file, "short\n");
        let short = read_token(&config).unwrap_err();
        assert!(
            !short.to_string().contains("short\n"),
            "the file's content is not shown"
        );
        let _ = std::fs::write(&file, "  a-long-enough-console-token\n");
        assert_eq!(
            read_token(&config).ok().flatten().as_deref(),
            Some("a-long-enough-console-token")
        );
        assert_eq!(read_token(&ConsoleConfig { token: None }), Ok(None));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
