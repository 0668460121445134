use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = hodei_relay::Config::parse();
    hodei_runtime::main(
        hodei_runtime::Threads::PerCpu,
        "hodei-relay",
        config.common.log_format,
        |shutdown| hodei_relay::run(config, shutdown),
    )
}
