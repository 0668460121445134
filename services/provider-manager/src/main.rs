use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = hodei_provider_manager::Config::parse();
    hodei_runtime::main(
        hodei_runtime::Threads::PerCpu,
        "hodei-provider-manager",
        config.common.log_format,
        |shutdown| hodei_provider_manager::run(config, shutdown),
    )
}
