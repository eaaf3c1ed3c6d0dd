//! Writes the man pages or the shell completions generated from the
//! command line: `cargo run --example generate -- man|completions DIR`
//! (what `make man` and `make completions` run).

use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let done = match args.as_slice() {
        [what, dir] if what == "man" => ublk_cow::generate::man_pages(Path::new(dir)),
        [what, dir] if what == "completions" => ublk_cow::generate::completions(Path::new(dir)),
        _ => {
            eprintln!("usage: generate man|completions DIR");
            std::process::exit(2);
        }
    };
    if let Err(e) = done {
        eprintln!("generate: {}", ublk_cow::cli::error_line(&e));
        std::process::exit(1);
    }
}
