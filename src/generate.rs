//! The manual pages and shell completions, generated from the command
//! line's clap definitions (by `examples/generate.rs`, which `make man` and
//! `make completions` run, and by the test that checks the pages): `ublk-cow(1)`
//! and one page per command, each option with its default and its text as
//! `--help` gives it, and completions for bash, zsh and fish. Nothing here
//! is written by hand but the sections clap does not know: exit status,
//! environment, files and the daemon's log.

use crate::cli::Cli;
use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};
use std::path::Path;

/// The shells whose completions are generated, with the file each gets.
pub const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "ublk-cow.bash"),
    (Shell::Zsh, "_ublk-cow"),
    (Shell::Fish, "ublk-cow.fish"),
];

/// The command line as the pages describe it: built, so that each
/// command's name for its page (`ublk-cow-add`) is set. A default that
/// depends on the machine (`--queues`, half its CPUs) is left to the text,
/// which says how it is chosen.
fn command() -> clap::Command {
    let mut cmd = Cli::command()
        .disable_help_subcommand(true)
        .mut_subcommand("add", |c| {
            c.mut_arg("queues", |a| a.hide_default_value(true))
        });
    cmd.build();
    cmd
}

/// The sections of `ublk-cow(1)` that clap does not know.
fn extra_sections() -> Roff {
    let mut r = Roff::default();
    r.control("SH", ["EXIT STATUS"]);
    for (code, text) in [
        ("0", "The command did what it was asked."),
        (
            "1",
            "A refusal or a failure at run time: bad input found after parsing (a \
             missing base, an overlay made for another base), a command that needs \
             root run by a user, a del that removed nothing, a check that found \
             problems, a daemon that failed to start.",
        ),
        (
            "2",
            "A command line that does not parse: an unknown command or option, a \
             value out of range.",
        ),
    ] {
        r.control("TP", []);
        r.text([bold(code)]);
        r.text([roman(text)]);
    }
    r.control("PP", []);
    r.text([roman(
        "Every error is one line on standard error, starting with \"ublk-cow: \".",
    )]);
    r.control("SH", ["ENVIRONMENT"]);
    r.control("TP", []);
    r.text([bold("RUST_LOG")]);
    r.text([roman(
        "What is logged, in the syntax of the env_logger crate (for example \
         \"debug\" or \"warn,ublk_cow=debug\"); the default is \"warn,ublk_cow=info\". \
         The log goes to standard error with --foreground, and to the daemon's log \
         file otherwise (see FILES).",
    )]);
    r.control("TP", []);
    r.text([bold("UBLK_COW_RUN_DIR")]);
    r.text([roman(
        "The run directory instead of /run/ublk-cow. It must be a directory of \
         root's or of the user's own, mode 0700.",
    )]);
    r.control("TP", []);
    r.text([bold("TMPDIR")]);
    r.text([roman(
        "Where a temporary overlay (add without --overlay) is made; /tmp if unset.",
    )]);
    for (var, text) in [
        (
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN",
            "The credentials of an s3:// base (add --base s3://BUCKET/KEY). add \
             reads every AWS_* variable once; the daemon keeps them in its state \
             file (mode 0600), so that recover opens the base the same way.",
        ),
        (
            "AWS_REGION",
            "The region of an s3:// base; us-east-1 if unset.",
        ),
        (
            "AWS_ENDPOINT_URL",
            "Another S3-compatible store than AWS (Ceph RGW, MinIO), as a URL; \
             requests then name the bucket in the path.",
        ),
        (
            "AWS_ALLOW_HTTP",
            "true lets AWS_ENDPOINT_URL be a plain http:// endpoint, without TLS.",
        ),
    ] {
        r.control("TP", []);
        r.text([bold(var)]);
        r.text([roman(text)]);
    }
    r.control("SH", ["FILES"]);
    for (file, text) in [
        (
            "/run/ublk-cow/N.json",
            "The state of device N: what it serves and which daemon serves it.",
        ),
        (
            "/run/ublk-cow/N.map",
            "The live block-state map of device N, kept when its daemon dies so that \
             recover and del lose no write.",
        ),
        (
            "/run/ublk-cow/N.log",
            "The log of device N's daemon. Removed when the device stops cleanly; kept \
             when the daemon fails (to start, or later), for the reason.",
        ),
        (
            "/run/ublk-cow/N.sock",
            "The control socket of device N's daemon.",
        ),
        (
            "/etc/ublk-cow/NAME.conf",
            "A device for the systemd unit ublk-cow@NAME.service.",
        ),
    ] {
        r.control("TP", []);
        r.text([italic(file)]);
        r.text([roman(text)]);
    }
    r
}

/// Writes `ublk-cow.1` and `ublk-cow-COMMAND.1` for each command into
/// `dir`.
pub fn man_pages(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let top = command();
    let mut pages = vec![(top.clone(), true)];
    pages.extend(
        top.get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(|c| (c.clone(), false)),
    );
    for (cmd, is_top) in pages {
        let man = Man::new(cmd);
        let path = dir.join(man.get_filename());
        let mut text = Vec::new();
        man.render(&mut text)?;
        let mut more = if is_top {
            extra_sections()
        } else {
            Roff::default()
        };
        more.control("SH", ["SEE ALSO"]);
        more.text([roman(if is_top {
            "The page of each command, ublk-cow-add(1) and so on; docs/usage.md."
        } else {
            "ublk-cow(1), for the exit status, the environment and the files."
        })]);
        text.extend_from_slice(more.to_roff().as_bytes());
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Writes the bash, zsh and fish completions into `dir`.
pub fn completions(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (shell, name) in SHELLS {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut command(), "ublk-cow", &mut text);
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
