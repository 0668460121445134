use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = hodei_provider_manager::Config::parse();
    hodei_runtime::init_tracing(hodei_provider_manager::SERVICE, config.common.log_format);
    hodei_provider_manager::run(config, hodei_runtime::Shutdown::on_signals()).await
}
