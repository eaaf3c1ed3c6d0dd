//! Progress bars for long commands, shown on stderr only when it is a
//! terminal and silent otherwise (a script, a log, systemd). One helper for
//! every command that waits on long work: `cache` of a range, `add
//! --preallocate`, `del` while the daemon flushes, and the commands to come
//! that copy data (`commit`, `push`) use it the same way.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// A progress bar, or nothing when stderr is not a terminal.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar for `total` bytes, labelled `what`.
    pub fn bytes(what: &str, total: u64) -> Progress {
        Progress::new(what, Some(total))
    }

    /// A spinner for work of unknown length, labelled `what`.
    pub fn spinner(what: &str) -> Progress {
        Progress::new(what, None)
    }

    fn new(what: &str, total: Option<u64>) -> Progress {
        Progress::on(std::io::stderr().is_terminal(), what, total)
    }

    /// A bar drawn on stderr if `terminal`, else nothing.
    fn on(terminal: bool, what: &str, total: Option<u64>) -> Progress {
        if !terminal {
            return Progress { bar: None };
        }
        let bar = match total {
            Some(t) => ProgressBar::new(t).with_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{msg} {spinner} {elapsed}")
                    .expect("a valid template"),
            ),
        };
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar: Some(bar) }
    }

    /// Whether a bar is shown (stderr is a terminal).
    pub fn shown(&self) -> bool {
        self.bar.is_some()
    }

    /// Sets how much is done.
    pub fn set(&self, done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
        }
    }

    /// Removes the bar, leaving the terminal as it was.
    pub fn finish(mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_only_on_a_terminal() {
        for total in [Some(100), None] {
            let silent = Progress::on(false, "test", total);
            assert!(!silent.shown());
            silent.set(50);
            silent.finish();
            let shown = Progress::on(true, "test", total);
            assert!(shown.shown());
            shown.set(50);
            assert_eq!(shown.bar.as_ref().unwrap().position(), 50);
            shown.finish();
        }
    }
}
