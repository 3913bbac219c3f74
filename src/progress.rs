//! Progress on long work: a spinner on a terminal, plain timestamped lines otherwise (CI, logs,
//! pipes), nothing with -q. Always on stderr.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::ui::Ui;

pub struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
    start: Instant,
    last: Mutex<String>,
}

impl Progress {
    pub fn new(ui: Ui, message: &str) -> Self {
        let quiet = ui.verbosity < 0;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed}] {msg}").expect("static template"));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar.set_message(message.to_string());
            bar
        });
        let p = Self { bar, quiet, start: Instant::now(), last: Mutex::new(String::new()) };
        if p.bar.is_none() {
            p.set(message);
        }
        p
    }

    /// The current state. On a terminal it replaces the spinner's text; otherwise a line is
    /// printed when the state changes.
    pub fn set(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(message.to_string()),
            None => {
                let mut last = self.last.lock().expect("progress lock");
                if *last != message {
                    self.plain(message);
                    *last = message.to_string();
                }
            }
        }
    }

    /// A line that stays (an event, a diff row).
    pub fn line(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => self.plain(message),
        }
    }

    fn plain(&self, message: &str) {
        if !self.quiet {
            let secs = self.start.elapsed().as_secs();
            eprintln!("[{:02}:{:02}] {message}", secs / 60, secs % 60);
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
