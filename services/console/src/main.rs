use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = hodei_console::Config::parse();
    hodei_runtime::main(
        hodei_runtime::Threads::PerCpu,
        "hodei-console",
        config.log_format,
        |shutdown| hodei_console::run(config, shutdown),
    )
}
