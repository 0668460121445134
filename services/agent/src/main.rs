use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = hodei_agent::Config::parse();
    hodei_runtime::init_tracing("agent", config.log_format);
    hodei_agent::run(config, hodei_runtime::Shutdown::on_signals()).await
}
