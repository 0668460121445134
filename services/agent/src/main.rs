use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = hodei_agent::Config::parse();
    // The token is read; it leaves the environment before any thread or job exists.
    // SAFETY: single-threaded here (the runtime starts below).
    unsafe { std::env::remove_var("HODEI_BOOTSTRAP_TOKEN") };
    hodei_runtime::main("hodei-agent", config.log_format, |shutdown| {
        hodei_agent::run(config, shutdown)
    })
}
