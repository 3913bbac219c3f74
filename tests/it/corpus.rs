//! The bad-input corpus in tests/corpus/: every case goes through the real binary and must be
//! refused with exit code 2, an error that names the file (and the line and field where they
//! apply), every `# expect:` text of the case, and no panic.
//!
//! A case is a file whose leading comment block says what it is and what the error must say:
//!
//! ```text
//! # case: chroma.port given as a word
//! # expect: line 5, `chroma.port`
//! # expect: invalid type: string "eighty", expected a whole number from 0 to 65535
//! ```
//!
//! - `config/*.yaml` runs as `--config FILE validate --no-tools`, and again as
//!   `--config FILE render-userdata --no-tools` (config errors read the same everywhere);
//! - `template/*.yaml` as `validate --no-tools --template FILE`;
//! - `document/*.yaml` as `validate --no-tools --document FILE`;
//! - `flags/*.args` holds one argument per line after its comments, run as they are.
//!
//! In a file case an expectation that starts with `line ` must follow the file's name directly
//! (`FILE:line 5, `field``), so the line is known to belong to that file; `{file}` in an
//! expectation stands for the path the binary was given. `regressions/` holds cases that show
//! bugs in src/ (named `KIND-*.EXT`); each is run by one ignored test at the end of this file.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::imgbuild;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Config,
    Template,
    Document,
    Flags,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Config, Kind::Template, Kind::Document, Kind::Flags];

    fn folder(self) -> &'static str {
        match self {
            Kind::Config => "config",
            Kind::Template => "template",
            Kind::Document => "document",
            Kind::Flags => "flags",
        }
    }

    fn extension(self) -> &'static str {
        if self == Kind::Flags { "args" } else { "yaml" }
    }

    /// Fewer cases than this and the corpus has been gutted.
    fn minimum(self) -> usize {
        match self {
            Kind::Config => 60,
            Kind::Template => 10,
            Kind::Document => 12,
            Kind::Flags => 10,
        }
    }

    /// The command lines a case file goes through (`file` as the binary is given it).
    fn commands(self, file: &str, text: &str) -> Vec<Vec<String>> {
        let owned = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        match self {
            Kind::Config => vec![owned(&["--config", file, "validate", "--no-tools"]), owned(&["--config", file, "render-userdata", "--no-tools"])],
            Kind::Template => vec![owned(&["validate", "--no-tools", "--template", file])],
            Kind::Document => vec![owned(&["validate", "--no-tools", "--document", file])],
            Kind::Flags => vec![text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect()],
        }
    }
}

#[derive(Debug)]
struct Case {
    path: PathBuf,
    /// `config/name.yaml`: where the file is copied in the run directory, and what the binary
    /// is given. None for flags.
    file: Option<String>,
    description: Option<String>,
    expects: Vec<String>,
    commands: Vec<Vec<String>>,
    bytes: Vec<u8>,
}

impl Case {
    fn load(kind: Kind, path: &Path) -> Case {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Lossy: a case may hold bytes that are not UTF-8 on purpose.
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let mut description = None;
        let mut expects = Vec::new();
        for line in text.lines().take_while(|l| l.starts_with('#')) {
            if let Some(d) = line.strip_prefix("# case:") {
                description = Some(d.trim().to_string());
            } else if let Some(e) = line.strip_prefix("# expect:") {
                expects.push(e.trim().to_string());
            }
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let file = (kind != Kind::Flags).then(|| format!("{}/{name}", kind.folder()));
        let commands = kind.commands(file.as_deref().unwrap_or_default(), &text);
        Case { path: path.to_path_buf(), file, description, expects, commands, bytes }
    }

    fn name(&self) -> String {
        self.path.strip_prefix(corpus()).unwrap_or(&self.path).display().to_string()
    }

    /// Runs every command of the case in a fresh directory; the problems found, if any.
    fn check(&self) -> Result<(), String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        if let Some(file) = &self.file {
            let dest = dir.path().join(file);
            std::fs::create_dir_all(dest.parent().unwrap()).map_err(|e| e.to_string())?;
            std::fs::write(&dest, &self.bytes).map_err(|e| e.to_string())?;
        }
        let mut problems = Vec::new();
        for args in &self.commands {
            let out = imgbuild(dir.path()).args(args).timeout(Duration::from_secs(60)).output().map_err(|e| format!("could not run imgbuild {args:?}: {e}"))?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let mut wrong = Vec::new();
            if out.status.code() != Some(2) {
                wrong.push(format!("exit code {:?}, not 2", out.status.code()));
            }
            if stderr.contains("panicked") || stdout.contains("panicked") {
                wrong.push("it panicked".to_string());
            }
            if !stdout.trim().is_empty() {
                wrong.push(format!("printed on stdout: {:?}", stdout.chars().take(200).collect::<String>()));
            }
            if let Some(file) = &self.file
                && !stderr.contains(file.as_str())
            {
                wrong.push(format!("the error does not name {file}"));
            }
            for expect in &self.expects {
                let expect = expect.replace("{file}", self.file.as_deref().unwrap_or_default());
                let needle = match &self.file {
                    Some(file) if expect.starts_with("line ") => format!("{file}:{expect}"),
                    _ => expect,
                };
                if !stderr.contains(&needle) {
                    wrong.push(format!("missing {needle:?}"));
                }
            }
            if !wrong.is_empty() {
                problems.push(format!("imgbuild {}\n    {}\n  stderr:\n    {}", args.join(" "), wrong.join("\n    "), stderr.trim().replace('\n', "\n    ")));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("\n  ")) }
    }
}

fn cases(kind: Kind) -> Vec<Case> {
    let dir = corpus().join(kind.folder());
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == kind.extension()))
        .collect();
    paths.sort();
    paths.iter().map(|p| Case::load(kind, p)).collect()
}

/// Checks the cases on a few threads (each runs the binary; most runs take milliseconds) and
/// fails once, listing every case that failed.
fn check_all(cases: &[Case]) {
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 4);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                while let Some(case) = cases.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if let Err(e) = case.check() {
                        failures.lock().unwrap().push(format!("{}: {e}", case.name()));
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap();
    failures.sort();
    assert!(failures.is_empty(), "{} of {} corpus cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn corpus_is_not_trivially_small_and_every_case_says_what_it_expects() {
    let mut counts = Vec::new();
    for kind in Kind::ALL {
        let cases = cases(kind);
        assert!(cases.len() >= kind.minimum(), "tests/corpus/{}: {} cases, expected at least {}", kind.folder(), cases.len(), kind.minimum());
        for c in &cases {
            assert!(c.description.is_some(), "{}: no `# case:` line", c.name());
            assert!(!c.expects.is_empty(), "{}: no `# expect:` line", c.name());
            assert!(c.commands.iter().all(|a| !a.is_empty()), "{}: no arguments", c.name());
        }
        counts.push(format!("{} {}", kind.folder(), cases.len()));
    }
    eprintln!("corpus: {}", counts.join(", "));
}

#[test]
fn corpus_config_cases_are_refused_with_file_line_and_field() {
    check_all(&cases(Kind::Config));
}

#[test]
fn corpus_template_cases_are_refused_with_file_line_and_resource_field() {
    check_all(&cases(Kind::Template));
}

#[test]
fn corpus_document_cases_are_refused_with_file_line_and_field() {
    check_all(&cases(Kind::Document));
}

#[test]
fn corpus_flag_cases_are_refused_before_any_aws_call() {
    check_all(&cases(Kind::Flags));
}

/// Every error of a config file carries a line inside the file (or none for the document as a
/// whole) — checked through the library on each corpus case, including the lines the header
/// comments take.
#[test]
fn corpus_config_error_lines_are_inside_the_file() {
    for case in cases(Kind::Config) {
        let text = String::from_utf8_lossy(&case.bytes);
        let err = imgbuild::config::parse(&text, "c.yaml").expect_err(&case.name());
        // A parser may point just past the last line break (an unexpected end of the file).
        let lines = text.split('\n').count();
        for e in &err.errors {
            assert!(!e.message.trim().is_empty(), "{}: an empty message: {err}", case.name());
            if let Some(line) = e.line {
                assert!((1..=lines).contains(&line), "{}: line {line} of {lines}: {err}", case.name());
            }
        }
    }
}

// --- regressions: bugs this corpus found in src/ (fixed); each test is named for the correct
// behaviour it checks today ---

fn regression(name: &str) {
    let path = corpus().join("regressions").join(name);
    let kind = match name.split('-').next() {
        Some("config") => Kind::Config,
        Some("template") => Kind::Template,
        Some("document") => Kind::Document,
        Some("flags") => Kind::Flags,
        other => panic!("{name}: unknown kind {other:?}"),
    };
    let case = Case::load(kind, &path);
    if let Err(e) = case.check() {
        panic!("{}: {}\n  {e}", case.name(), case.description.as_deref().unwrap_or_default());
    }
}

#[test]

fn regression_config_non_string_key_is_reported_at_its_line() {
    regression("config-non-string-key.yaml");
}

#[test]

fn regression_config_duplicate_key_is_reported_at_its_line() {
    regression("config-duplicate-key-line.yaml");
}

#[test]

fn regression_config_two_type_errors_in_one_section_are_both_reported() {
    regression("config-two-type-errors-one-section.yaml");
}

#[test]

fn regression_config_not_utf8_is_invalid_input_exit_2() {
    regression("config-not-utf-8.yaml");
}

#[test]

fn regression_missing_template_or_document_is_invalid_input_exit_2() {
    regression("flags-missing-template.args");
    regression("flags-missing-document.args");
}

#[test]

fn regression_guard_report_over_8k_is_read_whole() {
    regression("template-guard-report-imds-unset.yaml");
    regression("template-guard-report-no-block-device-mappings.yaml");
}

#[test]

fn regression_template_list_element_is_reported_at_its_line() {
    regression("template-list-element-line.yaml");
}

#[test]

fn regression_document_step_is_reported_at_its_line() {
    regression("document-step-line.yaml");
}

#[test]

fn regression_document_broken_yaml_is_reported_at_its_line() {
    regression("document-broken-yaml-line.yaml");
}

#[test]

fn regression_bake_regions_are_checked_before_any_aws_call() {
    regression("flags-bake-regions-checked-late.args");
}
