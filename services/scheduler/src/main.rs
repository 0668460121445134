use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = hodei_scheduler::Config::parse();
    hodei_runtime::init_tracing(hodei_scheduler::SERVICE, config.common.log_format);
    hodei_scheduler::run(config, hodei_runtime::Shutdown::on_signals()).await
}
