use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = hodei_audit::Config::parse();
    hodei_runtime::init_tracing(hodei_audit::SERVICE, config.common.log_format);
    hodei_audit::run(config, hodei_runtime::Shutdown::on_signals()).await
}
