//! Progress of a long command on a terminal: a bar on stderr when stderr is
//! a terminal, nothing otherwise (a script's output stays clean).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of bytes done out of a total; silent when stderr is no terminal.
pub(crate) struct Progress(Option<ProgressBar>);

impl Progress {
    /// A bar titled `what`, shown only on a terminal.
    pub(crate) fn bytes(what: &str) -> Progress {
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return Progress(None);
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        Progress(Some(bar))
    }

    /// `done` bytes of `total`.
    pub(crate) fn set(&self, done: u64, total: u64) {
        if let Some(b) = &self.0 {
            b.set_length(total);
            b.set_position(done);
        }
    }

    /// Removes the bar.
    pub(crate) fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}
