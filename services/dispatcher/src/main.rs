use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = hodei_dispatcher::Config::parse();
    hodei_runtime::main(
        hodei_runtime::Threads::PerCpu,
        "hodei-dispatcher",
        config.common.log_format,
        |shutdown| hodei_dispatcher::run(config, shutdown),
    )
}
