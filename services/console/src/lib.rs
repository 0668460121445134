//! hodei-console: the web console. Server-rendered pages (maud, which escapes everything it
//! splices) with a little plain JavaScript for live updates (Server-Sent Events fed by the
//! job events and logs on NATS): jobs with filters, a job's page (its explanation, its
//! timeline from the audit log, its live logs), workers, schedules (pause, resume) and dead
//! letters (replay, discard).
//!
//! The console holds no credential of its own. An operator logs in with their operator
//! `.creds` (as `hodei auth` makes them); the console connects to NATS with it for that
//! session alone, so nats-server itself checks the credential and every request the pages
//! make runs with the operator's own rights. The credential lives in memory only, for the
//! session; sessions are a random token in an HttpOnly, SameSite=Strict cookie, and every
//! change (a form) also carries the session's CSRF token.

mod live;
mod pages;
mod session;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use hodei_messaging::api::request;
use hodei_protocol::{subjects, ApiError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use session::{Session, Sessions};

/// hodei-console: the web console of Hodei.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "hodei-console", version, about, long_about = None)]
pub struct Config {
    /// NATS server URL; each operator's session connects to it with their own credential.
    #[arg(long, env = "HODEI_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    /// Address the console listens on (http). Keep it on loopback or behind a TLS proxy.
    #[arg(long, env = "HODEI_CONSOLE_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,

    /// Hours a session lasts after its login.
    #[arg(long, env = "HODEI_CONSOLE_SESSION_HOURS", default_value_t = 12)]
    pub session_hours: u64,

    /// Mark the session cookie `Secure` (the console is served over https, by a proxy).
    #[arg(long, env = "HODEI_CONSOLE_SECURE_COOKIE")]
    pub secure_cookie: bool,

    /// Log format: `human` or `json`.
    #[arg(long, env = "HODEI_LOG_FORMAT", default_value = "human")]
    pub log_format: hodei_runtime::LogFormat,
}

/// How long a request to a Hodei API may take.
const API_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct App {
    pub sessions: Sessions,
    pub nats_url: String,
    /// Ends the live streams, so that a stop does not wait for open pages.
    pub shutdown: hodei_runtime::Shutdown,
    /// `; Secure` on the session cookie, or nothing.
    pub cookie_flags: &'static str,
}

pub async fn run(config: Config, shutdown: hodei_runtime::Shutdown) -> anyhow::Result<()> {
    let app = Arc::new(App {
        sessions: Sessions::new(Duration::from_secs(config.session_hours.max(1) * 3600)),
        nats_url: config.nats_url.clone(),
        shutdown: shutdown.clone(),
        cookie_flags: if config.secure_cookie { "; Secure" } else { "" },
    });
    // Expired sessions end (and their connections close) within a minute.
    tokio::spawn({
        let (app, shutdown) = (Arc::clone(&app), shutdown.clone());
        async move {
            while shutdown
                .run_until_cancelled(tokio::time::sleep(Duration::from_secs(60)))
                .await
                .is_some()
            {
                app.sessions.reap().await;
            }
        }
    });
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    // The system tests read the address from this line.
    tracing::info!(%addr, "console on http://{addr}/");
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    tracing::info!("stopped");
    Ok(())
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/jobs") }))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/static/console.js", get(script))
        .route("/static/console.css", get(style))
        .route("/jobs", get(jobs))
        .route("/jobs/rows", get(job_rows))
        .route("/jobs/{id}", get(job))
        .route("/jobs/{id}/summary", get(job_summary))
        .route("/jobs/{id}/logs", get(live::logs))
        .route("/events/jobs", get(live::job_events))
        .route("/workers", get(workers))
        .route("/schedules", get(schedules))
        .route("/schedules/{id}/{action}", post(schedule_action))
        .route("/dlq", get(dead_letters))
        .route("/dlq/{seq}/{action}", post(dead_letter_action))
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(app)
}

/// Every answer: no inline script or style runs, nothing is framed, types are not guessed.
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../assets/console.js"),
    )
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../assets/console.css"),
    )
}

/// The request's live session: a page asked without one sends the browser to log in.
pub(crate) struct Operator(pub Arc<Session>);

impl axum::extract::FromRequestParts<Arc<App>> for Operator {
    type Rejection = Failure;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        app: &Arc<App>,
    ) -> Result<Self, Failure> {
        app.sessions
            .of(&parts.headers)
            .map(Operator)
            .ok_or(Failure::Login)
    }
}

/// What a page answers when it cannot show what was asked.
pub(crate) enum Failure {
    /// No session: log in first.
    Login,
    /// The API refused or failed; shown to the operator.
    Api(ApiError),
    /// A form without the session's CSRF token.
    Forbidden,
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        Failure::Api(error)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        match self {
            Failure::Login => Redirect::to("/login").into_response(),
            Failure::Forbidden => (
                StatusCode::FORBIDDEN,
                pages::error_page("That form is not from this session: reload the page."),
            )
                .into_response(),
            Failure::Api(error) => {
                let status = match error.code {
                    hodei_protocol::ErrorCode::NotFound => StatusCode::NOT_FOUND,
                    code if code.is_transient() => StatusCode::BAD_GATEWAY,
                    _ => StatusCode::BAD_REQUEST,
                };
                (
                    status,
                    pages::error_page(&format!("{} ({})", error.message, error.code.as_str())),
                )
                    .into_response()
            }
        }
    }
}

/// A Hodei API request with the session's own connection.
pub(crate) async fn ask<Req: Serialize, Resp: DeserializeOwned>(
    session: &Session,
    subject: &str,
    body: &Req,
) -> Result<Resp, Failure> {
    Ok(request(&session.client, subject, None, body, API_TIMEOUT).await?)
}

async fn login_page() -> maud::Markup {
    pages::login(None)
}

#[derive(Deserialize)]
struct LoginForm {
    creds: String,
}

async fn login(State(app): State<Arc<App>>, Form(form): Form<LoginForm>) -> Response {
    match app.sessions.open(&app.nats_url, &form.creds).await {
        Ok((token, user)) => {
            tracing::info!(%user, "operator logged in");
            let cookie = format!(
                "{}={token}; HttpOnly; SameSite=Strict; Path=/{}",
                session::COOKIE,
                app.cookie_flags
            );
            ([(header::SET_COOKIE, cookie)], Redirect::to("/jobs")).into_response()
        }
        Err(why) => {
            tracing::warn!(%why, "login refused");
            (StatusCode::UNAUTHORIZED, pages::login(Some(&why))).into_response()
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Operator(session): Operator,
    Form(form): Form<CsrfForm>,
) -> Result<Response, Failure> {
    session.check_csrf(&form.csrf)?;
    app.sessions.close(&headers).await;
    tracing::info!(user = %session.user, "operator logged out");
    let cookie = format!(
        "{}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        session::COOKIE
    );
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response())
}

/// The filters of the jobs page.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct JobFilter {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub key: String,
    /// `NAME=VALUE`.
    #[serde(default)]
    pub label: String,
}

impl JobFilter {
    fn request(&self) -> Result<hodei_protocol::api::ListJobs, Failure> {
        let state = match self.state.as_str() {
            "" => None,
            s => Some(
                s.parse()
                    .map_err(|e: String| Failure::Api(ApiError::bad_request(e)))?,
            ),
        };
        let labels = match self.label.split_once('=') {
            Some((k, v)) => [(k.to_owned(), v.to_owned())].into(),
            None if self.label.is_empty() => Default::default(),
            None => {
                return Err(Failure::Api(ApiError::bad_request(
                    "a label filter is NAME=VALUE",
                )))
            }
        };
        Ok(hodei_protocol::api::ListJobs {
            state,
            concurrency_key: (!self.key.is_empty()).then(|| self.key.clone()),
            labels,
            limit: Some(100),
            ..Default::default()
        })
    }
}

async fn list_jobs(
    session: &Session,
    filter: &JobFilter,
) -> Result<hodei_protocol::api::Page<hodei_protocol::api::JobView>, Failure> {
    ask(session, subjects::API_JOBS_LIST, &filter.request()?).await
}

async fn jobs(
    Operator(session): Operator,
    Query(filter): Query<JobFilter>,
) -> Result<maud::Markup, Failure> {
    let page = list_jobs(&session, &filter).await?;
    Ok(pages::jobs(&session, &filter, &page))
}

async fn job_rows(
    Operator(session): Operator,
    Query(filter): Query<JobFilter>,
) -> Result<maud::Markup, Failure> {
    Ok(pages::job_rows(&list_jobs(&session, &filter).await?))
}

/// A job, its explanation and its timeline.
async fn job_parts(
    session: &Session,
    job_id: Uuid,
) -> Result<
    (
        hodei_protocol::api::JobView,
        Vec<hodei_protocol::api::AuditEntry>,
    ),
    Failure,
> {
    let job: hodei_protocol::api::JobView = ask(
        session,
        subjects::API_JOBS_GET,
        &hodei_protocol::api::GetJob {
            schema_version: hodei_protocol::SCHEMA_VERSION,
            job_id,
        },
    )
    .await?;
    let trail: hodei_protocol::api::Page<hodei_protocol::api::AuditEntry> = ask(
        session,
        subjects::API_AUDIT_QUERY,
        &hodei_protocol::api::AuditQuery {
            correlation_id: Some(job.correlation_id.clone()),
            limit: Some(1000),
            ..Default::default()
        },
    )
    .await?;
    Ok((job, trail.items))
}

async fn job(
    Operator(session): Operator,
    Path(job_id): Path<Uuid>,
) -> Result<maud::Markup, Failure> {
    let (job, trail) = job_parts(&session, job_id).await?;
    Ok(pages::job(&session, &job, &trail))
}

async fn job_summary(
    Operator(session): Operator,
    Path(job_id): Path<Uuid>,
) -> Result<maud::Markup, Failure> {
    let (job, trail) = job_parts(&session, job_id).await?;
    Ok(pages::job_summary(&job, &trail))
}

async fn workers(Operator(session): Operator) -> Result<maud::Markup, Failure> {
    let page = ask(
        &session,
        subjects::API_WORKERS_LIST,
        &hodei_protocol::api::ListWorkers {
            limit: Some(200),
            ..Default::default()
        },
    )
    .await?;
    Ok(pages::workers(&session, &page))
}

async fn schedules(Operator(session): Operator) -> Result<maud::Markup, Failure> {
    let page = ask(
        &session,
        subjects::API_SCHEDULES_LIST,
        &hodei_protocol::schedules::ListSchedules {
            schema_version: hodei_protocol::SCHEMA_VERSION,
            state: None,
            limit: Some(200),
            cursor: None,
        },
    )
    .await?;
    Ok(pages::schedules(&session, &page))
}

async fn schedule_action(
    Operator(session): Operator,
    Path((id, action)): Path<(Uuid, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, Failure> {
    session.check_csrf(&form.csrf)?;
    let subject = match action.as_str() {
        "pause" => subjects::API_SCHEDULES_PAUSE,
        "resume" => subjects::API_SCHEDULES_RESUME,
        _ => return Err(ApiError::not_found(format!("no action {action:?}")).into()),
    };
    let _: hodei_protocol::schedules::ScheduleView = ask(
        &session,
        subject,
        &hodei_protocol::schedules::ScheduleRef {
            schema_version: hodei_protocol::SCHEMA_VERSION,
            schedule: id.to_string(),
        },
    )
    .await?;
    tracing::info!(user = %session.user, schedule_id = %id, %action, "schedule changed from the console");
    Ok(Redirect::to("/schedules"))
}

async fn dead_letters(Operator(session): Operator) -> Result<maud::Markup, Failure> {
    let page = ask(
        &session,
        subjects::API_DLQ_LIST,
        &hodei_protocol::api::ListDeadLetters {
            schema_version: hodei_protocol::SCHEMA_VERSION,
            limit: Some(200),
            cursor: None,
        },
    )
    .await?;
    Ok(pages::dead_letters(&session, &page))
}

async fn dead_letter_action(
    Operator(session): Operator,
    Path((seq, action)): Path<(u64, String)>,
    Form(form): Form<CsrfForm>,
) -> Result<Redirect, Failure> {
    session.check_csrf(&form.csrf)?;
    let subject = match action.as_str() {
        "replay" => subjects::API_DLQ_REPLAY,
        "discard" => subjects::API_DLQ_DISCARD,
        _ => return Err(ApiError::not_found(format!("no action {action:?}")).into()),
    };
    let _: hodei_protocol::api::DeadLetter = ask(
        &session,
        subject,
        &hodei_protocol::api::DeadLetterRef {
            schema_version: hodei_protocol::SCHEMA_VERSION,
            seq,
            actor: Some(format!("console:{}", session.user)),
        },
    )
    .await?;
    tracing::info!(user = %session.user, seq, %action, "dead letter handled from the console");
    Ok(Redirect::to("/dlq"))
}
