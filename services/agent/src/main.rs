use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = hodei_agent::Config::parse();
    hodei_runtime::main("hodei-agent", config.log_format, |shutdown| {
        hodei_agent::run(config, shutdown)
    })
}
