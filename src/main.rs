//! The `herald` binary: parse the command line, set up telemetry, load settings, run.

use std::process::ExitCode;

use clap::Parser;
use herald::{
    cli::{self, Cli},
    config::Settings,
    telemetry::{self, LogFormat},
};

/// mimalloc instead of glibc's malloc: see Cargo.toml and BENCHMARKS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Configuration errors are one line on stderr for a person, not a log record.
    let format = match LogFormat::from_env() {
        Ok(format) => format,
        Err(message) => return fail(&message),
    };
    telemetry::init_tracing(format);
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(error) => return fail(&error.to_string()),
    };
    match cli::run(cli.command, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&format!("{error:#}")),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("herald: {message}");
    ExitCode::FAILURE
}
