use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = hodei_relay::Config::parse();
    hodei_runtime::init_tracing(hodei_relay::SERVICE, config.common.log_format);
    hodei_relay::run(config, hodei_runtime::Shutdown::on_signals()).await
}
