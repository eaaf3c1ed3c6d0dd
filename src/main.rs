//! The `ublk-cow` executable: parses the command line, runs the command,
//! and turns any error into one line on stderr and an exit status: 0 done,
//! 1 a runtime failure or refusal, 2 a command line that does not parse.

use clap::Parser;
use clap::error::ErrorKind;
use ublk_cow::cli::{Cli, error_line, run};

/// clap's usage errors span several lines; the user gets one: the error,
/// then any `tip:` (a similar argument or subcommand) after a `;`.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut parts: Vec<String> = Vec::new();
    let mut paragraphs = text.split("\n\n");
    if let Some(first) = paragraphs.next() {
        let joined: Vec<&str> = first.lines().map(str::trim).collect();
        parts.push(joined.join(" ").trim_start_matches("error: ").to_string());
    }
    for p in paragraphs {
        for l in p.lines().map(str::trim) {
            if l.starts_with("tip:") {
                parts.push(l.to_string());
            }
        }
    }
    parts.join("; ")
}

fn main() {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,ublk_cow=info"),
    )
    .format_timestamp_secs()
    .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            eprintln!("ublk-cow: {} (see --help)", one_line(&e));
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("ublk-cow: {}", error_line(&e));
        std::process::exit(1);
    }
}
