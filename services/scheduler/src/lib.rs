//! The scheduler owns job submission and the job state machine: it accepts jobs (request/reply
//! and the durable submission stream, idempotent on the client's key), answers get and list,
//! applies the agents' started/finished reports to their jobs, and owns schedules (their API
//! and their ticks).

mod handlers;
mod monitor;
mod ticker;

use async_nats::Client;
use hodei_domain::Actor;
use hodei_messaging::consumer::{self, ConsumerConfig};
use hodei_messaging::{api, streams, JetStream};
use hodei_protocol::subjects;
use hodei_runtime::{CommonArgs, Shutdown};

pub const SERVICE: &str = "scheduler";

/// hodei-scheduler: accepts jobs and applies workers' reports to them.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "hodei-scheduler", version, about, long_about = None)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Largest number of database connections.
    #[arg(long, env = "HODEI_DB_POOL_SIZE", default_value_t = 10)]
    pub db_pool_size: u32,

    /// Longest pause of the state-timeout monitor between looks at the deadlines (ms); it
    /// also wakes for the next deadline it knows of.
    #[arg(long, env = "HODEI_MONITOR_INTERVAL_MS", default_value_t = 1000)]
    pub monitor_interval_ms: u64,
}

/// How long the providers' offers are taken as they were read.
pub(crate) const OFFERS_FRESH_FOR: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Clone)]
pub(crate) struct State {
    pub store: hodei_store::Store,
    pub client: Client,
    pub actor: Actor,
    /// What the providers offer, read again when older than a few seconds.
    pub offers:
        std::sync::Arc<tokio::sync::Mutex<(std::time::Instant, Vec<hodei_domain::ProviderOffer>)>>,
    /// Wakes this instance's ticker when it creates or resumes a schedule.
    pub ticks: std::sync::Arc<tokio::sync::Notify>,
    /// Where new jobs wait for the transaction that accepts them ([`handlers::submit::accept_all`]).
    pub accepting: tokio::sync::mpsc::Sender<handlers::submit::Submission>,
}

pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut metrics = hodei_runtime::metrics::Metrics::new();
    let messaging = hodei_messaging::Metrics::register(&mut metrics);
    let connections = hodei_outbox::connect(
        &config.common,
        SERVICE,
        config.db_pool_size,
        &mut metrics,
        &shutdown,
    )
    .await?;
    hodei_store::register_state_gauges(
        &mut metrics,
        connections.store.pool(),
        "jobs",
        "hodei_jobs",
        "Jobs by state",
        hodei_domain::JobState::ALL
            .iter()
            .map(|s| s.as_str())
            .collect(),
    );
    let (accepting, submissions) = handlers::submit::queue();
    handlers::submit::register_queue_gauge(&mut metrics, &accepting);
    connections
        .serve_metrics(&config.common, 9611, metrics, &shutdown)
        .await?;
    let hodei_outbox::Connections { store, client, js } = connections;
    let state = State {
        store,
        client: client.clone(),
        actor: Actor::service(SERVICE),
        offers: std::sync::Arc::new(tokio::sync::Mutex::new((
            std::time::Instant::now() - OFFERS_FRESH_FOR,
            Vec::new(),
        ))),
        ticks: std::sync::Arc::new(tokio::sync::Notify::new()),
        accepting,
    };
    // Submissions are accepted until the service has answered every request it took.
    let served = hodei_runtime::Shutdown::new();
    let acceptor = tokio::spawn(handlers::submit::accept_all(
        state.clone(),
        submissions,
        served.clone(),
    ));
    let monitor = tokio::spawn(monitor::run(
        state.store.clone(),
        std::time::Duration::from_millis(config.monitor_interval_ms),
        shutdown.clone(),
    ));
    let ticker = tokio::spawn(ticker::run(
        state.clone(),
        std::time::Duration::from_millis(config.monitor_interval_ms),
        shutdown.clone(),
    ));
    let outcome = serve(state, js, &messaging, shutdown).await;
    served.cancel();
    let _ = acceptor.await;
    let _ = monitor.await;
    let _ = ticker.await;
    outcome
}

async fn serve(
    state: State,
    js: JetStream,
    metrics: &hodei_messaging::Metrics,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let service = api::Service::start(
        state.client.clone(),
        "hodei-scheduler",
        "Accepts jobs, answers what they are, cancels them, and keeps their schedules",
        "hodei-scheduler",
        metrics,
    )
    .await?;
    let submit = {
        let state = state.clone();
        service.serve(
            subjects::API_JOBS_SUBMIT,
            shutdown.clone(),
            move |req, ctx| handlers::submit::from_api(state.clone(), req, ctx),
        )
    };
    let get = {
        let state = state.clone();
        service.serve(subjects::API_JOBS_GET, shutdown.clone(), move |req, _| {
            handlers::query::get(state.clone(), req)
        })
    };
    let list = {
        let state = state.clone();
        service.serve(subjects::API_JOBS_LIST, shutdown.clone(), move |req, _| {
            handlers::query::list(state.clone(), req)
        })
    };
    let cancel = {
        let state = state.clone();
        service.serve(
            subjects::API_JOBS_CANCEL,
            shutdown.clone(),
            move |req, _| handlers::cancel::handle(state.clone(), req),
        )
    };
    macro_rules! schedule_api {
        ($subject:expr, $handler:path) => {{
            let state = state.clone();
            service.serve($subject, shutdown.clone(), move |req, _| {
                $handler(state.clone(), req)
            })
        }};
    }
    let schedules = async {
        use handlers::schedules as h;
        let (create, list, get, pause, resume, delete) = tokio::join!(
            schedule_api!(subjects::API_SCHEDULES_CREATE, h::create),
            schedule_api!(subjects::API_SCHEDULES_LIST, h::list),
            schedule_api!(subjects::API_SCHEDULES_GET, h::get),
            schedule_api!(subjects::API_SCHEDULES_PAUSE, h::pause),
            schedule_api!(subjects::API_SCHEDULES_RESUME, h::resume),
            schedule_api!(subjects::API_SCHEDULES_DELETE, h::delete),
        );
        create.and(list).and(get).and(pause).and(resume).and(delete)
    };
    let submissions = consumer::run(
        js.clone(),
        ConsumerConfig::new(streams::SUBMISSIONS, "scheduler-submissions", None),
        metrics,
        shutdown.clone(),
        |delivery| handlers::submit::from_stream(state.clone(), delivery),
    );
    let reports = consumer::run_batched(
        js.clone(),
        ConsumerConfig::new(streams::AGENT, "scheduler-reports", None),
        handlers::reports::MAX_BATCH,
        metrics,
        shutdown.clone(),
        |batch| handlers::reports::handle(state.clone(), batch),
    );
    let (submit, get, list, cancel, schedules, (), ()) =
        tokio::join!(submit, get, list, cancel, schedules, submissions, reports);
    submit?;
    schedules?;
    cancel?;
    get?;
    list?;
    service.stop().await;
    tracing::info!("stopped");
    Ok(())
}
