use std::process::ExitCode;

use clap::Parser;
use imgbuild::cli::Cli;
use imgbuild::ui::Ui;

fn main() -> ExitCode {
    // clap prints usage errors itself and exits with 2.
    let cli = Cli::parse();
    let ui = Ui::new(cli.global.output, cli.global.verbose, cli.global.quiet);
    let result = imgbuild::cmd::run(cli, ui);
    // A reader that went away (`| head -1`) ends the command quietly, with the code a shell
    // reports for a program SIGPIPE stopped.
    if imgbuild::ui::pipe_broken() || result.as_ref().is_err_and(|e| e.is_broken_pipe()) {
        return ExitCode::from(imgbuild::ui::EXIT_BROKEN_PIPE);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            ui.error(&err);
            if imgbuild::ui::pipe_broken() {
                return ExitCode::from(imgbuild::ui::EXIT_BROKEN_PIPE);
            }
            ExitCode::from(err.exit_code())
        }
    }
}
