use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = hodei_registry::Config::parse();
    hodei_runtime::init_tracing(hodei_registry::SERVICE, config.common.log_format);
    hodei_registry::run(config, hodei_runtime::Shutdown::on_signals()).await
}
