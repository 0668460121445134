use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = hodei_dispatcher::Config::parse();
    hodei_runtime::init_tracing(hodei_dispatcher::SERVICE, config.common.log_format);
    hodei_dispatcher::run(config, hodei_runtime::Shutdown::on_signals()).await
}
