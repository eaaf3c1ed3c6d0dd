use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_secs()
        .init();
    let cli = ublk_cow::cli::Cli::parse();
    if let Err(e) = ublk_cow::cli::run(cli) {
        eprintln!("ublk-cow: {e:#}");
        std::process::exit(1);
    }
}
