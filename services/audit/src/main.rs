use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = hodei_audit::Config::parse();
    hodei_runtime::main(
        hodei_runtime::Threads::PerCpu,
        "hodei-audit",
        config.common.log_format,
        |shutdown| hodei_audit::run(config, shutdown),
    )
}
