//! Progress on long work: a spinner on a terminal, plain timestamped lines otherwise (CI, logs,
//! pipes), nothing with -q. Always on stderr.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::ui::Ui;

pub struct Progress {
    /// The spinner, when stderr is a terminal and it is not paused.
    bar: Mutex<Option<ProgressBar>>,
    spinner: bool,
    quiet: bool,
    start: Instant,
    last: Mutex<String>,
}

fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed}] {msg}").expect("static template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(message.to_string());
    bar
}

impl Progress {
    pub fn new(ui: Ui, message: &str) -> Self {
        let quiet = ui.verbosity < 0;
        let spinner_on = !quiet && std::io::stderr().is_terminal();
        let p = Self {
            bar: Mutex::new(spinner_on.then(|| spinner(message))),
            spinner: spinner_on,
            quiet,
            start: Instant::now(),
            last: Mutex::new(message.to_string()),
        };
        if !spinner_on {
            p.plain(message);
        }
        p
    }

    /// The current state. On a terminal it replaces the spinner's text; otherwise a line is
    /// printed when the state changes.
    pub fn set(&self, message: &str) {
        let mut last = self.last.lock().expect("progress lock");
        if *last == message {
            return;
        }
        *last = message.to_string();
        match self.bar.lock().expect("progress lock").as_ref() {
            Some(bar) => bar.set_message(message.to_string()),
            None if !self.spinner => self.plain(message),
            None => {}
        }
    }

    /// A line that stays (an event, a diff row).
    pub fn line(&self, message: &str) {
        match self.bar.lock().expect("progress lock").as_ref() {
            Some(bar) => bar.println(message),
            None => self.plain(message),
        }
    }

    /// Takes the spinner off the screen while the user is asked something.
    pub fn pause(&self) {
        if let Some(bar) = self.bar.lock().expect("progress lock").take() {
            bar.finish_and_clear();
        }
    }

    /// Puts the spinner back after `pause`.
    pub fn resume(&self) {
        if self.spinner {
            let mut bar = self.bar.lock().expect("progress lock");
            if bar.is_none() {
                *bar = Some(spinner(&self.last.lock().expect("progress lock")));
            }
        }
    }

    fn plain(&self, message: &str) {
        if !self.quiet {
            let secs = self.start.elapsed().as_secs();
            super::stderr_line(&format!("[{:02}:{:02}] {message}", secs / 60, secs % 60));
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.pause();
    }
}
