//! `hodei-trace-sink`: an OTLP/HTTP trace receiver that prints every span it receives as a
//! JSON line (service, name, trace id, span id, parent). docker-compose.yml runs it where
//! no Jaeger image can be built (a machine without a registry), so that the services'
//! traces have somewhere to go and can be read: `docker-compose -p hodei logs traces`.
//! Elsewhere, point `OTEL_EXPORTER_OTLP_ENDPOINT` at Jaeger instead.

use std::sync::Arc;

use clap::Parser;
use hodei_tests::otlp::Receiver;

#[derive(Parser)]
#[command(name = "hodei-trace-sink")]
struct Options {
    /// Address to listen on (OTLP/HTTP: POST /v1/traces).
    #[arg(long, env = "HODEI_TRACE_SINK_ADDR", default_value = "0.0.0.0:4318")]
    listen: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let options = Options::parse();
    let receiver = Receiver::start_on(
        &options.listen,
        Some(Arc::new(|span| {
            println!(
                "{}",
                serde_json::to_string(span).expect("a span serializes")
            );
        })),
    )
    .await;
    eprintln!(
        "receiving OTLP/HTTP traces on {}/v1/traces",
        receiver.endpoint
    );
    // Until SIGTERM (docker stop) or SIGINT.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
