use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = hodei_scheduler::Config::parse();
    hodei_runtime::main(
        hodei_runtime::Threads::PerCpu,
        "hodei-scheduler",
        config.common.log_format,
        |shutdown| hodei_scheduler::run(config, shutdown),
    )
}
