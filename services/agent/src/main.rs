use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config =
        if std::env::args_os().nth(1).as_deref() == Some(hodei_protocol::spawner::FLAG.as_ref()) {
            // Returns only in a new agent, forked with its own environment (see `spawner`).
            hodei_agent::spawner::serve()?;
            hodei_agent::Config::parse_from(["hodei-agent"])
        } else {
            hodei_agent::Config::parse()
        };
    // The token is read; it leaves the environment (its bytes too, which /proc/<pid>/environ
    // would still show) before any thread or job exists.
    // SAFETY: single-threaded here (the runtime starts below); getenv points into this
    // process's own environment block, `strlen` bytes long.
    unsafe {
        let value = libc::getenv(c"HODEI_BOOTSTRAP_TOKEN".as_ptr());
        if !value.is_null() {
            std::ptr::write_bytes(value, 0, libc::strlen(value));
        }
        std::env::remove_var("HODEI_BOOTSTRAP_TOKEN");
    }
    hodei_runtime::main(
        hodei_runtime::Threads::One,
        "hodei-agent",
        config.log_format,
        |shutdown| hodei_agent::run(config, shutdown),
    )
}
