use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = hodei_registry::Config::parse();
    hodei_runtime::main(
        hodei_runtime::Threads::PerCpu,
        "hodei-registry",
        config.common.log_format,
        |shutdown| hodei_registry::run(config, shutdown),
    )
}
