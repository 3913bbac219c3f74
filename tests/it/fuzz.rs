//! Bounded fuzzing (proptest) of the config parser and the renderer.
//!
//! Parser: arbitrary text, YAML-looking token soup, and structured mutations of a valid config
//! (random values, types, keys and nesting at random paths, then text edits) never panic; every
//! error has a message and a line inside the text; what is accepted passes `Config::check` and
//! survives a round trip. Renderer: valid configs drawn from every supported Chroma range, both
//! storage modes, any port, optional ids, regions and env, in every mode, format and gzip,
//! render the same bytes twice, report their real size, fail the size check exactly when over
//! the limit, validate otherwise, and never download at boot in baked mode.
//!
//! Runs are deterministic: a fixed seed (ChaCha) and no failure files written into the source
//! tree, so CI cannot flake and a failure reproduces with the same command. To explore further,
//! `IMGBUILD_FUZZ_SEED=random` (or a number) and `PROPTEST_CASES=N`; proptest prints the
//! minimal failing input, which belongs in tests/corpus/ once understood.

use std::collections::BTreeMap;

use imgbuild::check::userdata::{self as validate, Status, Tools};
use imgbuild::config::{self, Config, StorageMode};
use imgbuild::render::{self, Format, Inputs, Mode, USERDATA_LIMIT};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm, RngSeed};
use serde_yaml::Value;

/// The seed CI runs with. Change it only together with a look at what the new one finds.
const SEED: u64 = 0x1bd6_b01d_c0de_5eed;

fn settings(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(cases);
    let rng_seed = match std::env::var("IMGBUILD_FUZZ_SEED").as_deref() {
        Ok("random") => RngSeed::Random,
        Ok(n) => RngSeed::Fixed(n.parse().expect("IMGBUILD_FUZZ_SEED is `random` or a number")),
        Err(_) => RngSeed::Fixed(SEED),
    };
    ProptestConfig {
        cases,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed,
        failure_persistence: None,
        // A failure shrinks for a bounded time, so a red run still ends quickly.
        max_shrink_iters: 4096,
        max_shrink_time: 30_000,
        ..ProptestConfig::default()
    }
}

// --- the parser's properties ----------------------------------------------------------------

/// Lines as a YAML parser counts them: LF, CRLF and lone CR, and (libyaml) NEL, LS and PS.
/// A parser may point just past the last break (end of file), hence the + 1.
fn yaml_line_count(text: &str) -> usize {
    let mut n = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                n += 1;
            }
            '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => n += 1,
            _ => {}
        }
    }
    n
}

/// What `config::parse` must do with any text: no panic (proptest fails on one), a message on
/// every error and a line inside the text; an accepted config is checked clean and round-trips.
fn parse_holds(text: &str) -> Result<(), TestCaseError> {
    match config::parse(text, "fuzz.yaml") {
        Ok(c) => {
            prop_assert_eq!(c.check(), Vec::<(String, String)>::new());
            let again = serde_yaml::to_string(&c).expect("configs serialise");
            match config::parse(&again, "again.yaml") {
                Ok(d) => prop_assert_eq!(d, c, "an accepted config changes on a round trip:\n{}", again),
                Err(e) => prop_assert!(false, "an accepted config is refused once written out: {}\n{}", e, again),
            }
        }
        Err(err) => {
            prop_assert!(!err.errors.is_empty(), "an Err with no errors");
            prop_assert_eq!(err.file.as_str(), "fuzz.yaml");
            // Strict: an error at the end of a file without a final newline once named the line
            // after the last (`end_of_file_errors_stay_inside_the_file` keeps examples).
            let lines = yaml_line_count(text);
            for e in &err.errors {
                prop_assert!(!e.message.trim().is_empty(), "an empty message for `{}`", e.field);
                if let Some(line) = e.line {
                    prop_assert!((1..=lines).contains(&line), "line {} of a {}-line text: {}\n{:?}", line, lines, err, text);
                }
            }
        }
    }
    Ok(())
}

#[test]
fn end_of_file_errors_stay_inside_the_file() {
    for text in ["name: vectordb\nregion: us-east-1\nbake", "name: vectordb\nchroma:\n  port: 8000\n  image", "- \rname"] {
        let err = config::parse(text, "f.yaml").expect_err(text);
        let lines = yaml_line_count(text);
        for e in &err.errors {
            assert!(e.line.is_some_and(|l| l <= lines), "{text:?} has {lines} lines: {err}");
        }
    }
}

#[test]
fn regression_empty_list_item_is_located_on_the_next_line() {
    for text in ["bake:\n  regions:\n  -", "bake:\n  regions:\n  -\n", "bake:\n  regions:\n  -\n  - us-east-1\n"] {
        let err = config::parse(text, "f.yaml").expect_err(text);
        let e = err.errors.iter().find(|e| e.field == "bake.regions[0]").unwrap_or_else(|| panic!("{text:?}: {err}"));
        assert_eq!(e.line, Some(3), "{text:?}: {err}");
    }
}

/// Pieces config files (and broken ones) are made of.
const TOKENS: &[&str] = &[
    "name",
    "region",
    "chroma",
    "version",
    "image",
    "digest",
    "port",
    "env",
    "storage",
    "mode",
    "mount_point",
    "efs",
    "file_system_id",
    "compose",
    "sha256",
    "x86_64",
    "aarch64",
    "stack",
    "instance_type",
    "vpc_cidr",
    "nat_gateways",
    "allowed_client_cidr",
    "log_retention_days",
    "integration_timeout_ms",
    "bake",
    "base_ami",
    "subnet_id",
    "security_group_id",
    "instance_profile",
    "automation_role_arn",
    "timeout_secs",
    "regions",
    "manifest",
    "aws",
    "retry_mode",
    "max_attempts",
    "operation_timeout_secs",
    "stack_timeout_secs",
    "poll_interval_secs",
    ": ",
    ":",
    "\n",
    "\n  ",
    "\n    ",
    "  ",
    "\t",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ", ",
    "'",
    "\"",
    "# ",
    "&a ",
    "*a",
    "!tag ",
    "!!str ",
    "? ",
    "|",
    ">",
    "---\n",
    "...\n",
    "~",
    "null",
    "true",
    "0",
    "-1",
    "70000",
    "1.5",
    "1.5.9",
    "0.4.13",
    "1e400",
    ".nan",
    "0x1F",
    "%YAML 1.2\n",
    "\r",
    "\r\n",
    "\u{85}",
    "\u{2028}",
    "é",
    "\u{feff}",
    "\\",
    "fs-0123456789abcdef0",
    "sha256:",
    "us-east-1",
    "0.0.0.0/0",
    "10.0.0.0/16",
    "efs-tls",
    "docker-nfs",
    "per-az",
    "adaptive",
    "/mnt/chroma",
    "ALLOW_RESET",
    "AUTH_TOKEN",
    "IS_PERSISTENT",
    "<<: ",
    "=",
    "@",
    "`",
];

fn token_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(TOKENS), 0..120).prop_map(|t| t.concat())
}

const STRINGS: &[&str] = &[
    "",
    "latest",
    "1.5.9",
    "0.4.13",
    "0.5.16",
    "2.0.0",
    "v1.5.9",
    "1.0.0-rc.1",
    "fs-0123456789abcdef0",
    "fs-XYZ",
    "sha256:0000000000000000000000000000000000000000000000000000000000000000",
    "us-east-1",
    "US-EAST-1",
    "0.0.0.0/0",
    "10.0.0.0/16",
    "10.0.0.1/16",
    "10.0.0.0/24",
    "t3a.small",
    "ami-0123456789abcdef0",
    "efs-tls",
    "docker-nfs",
    "one",
    "per-az",
    "standard",
    "adaptive",
    "/mnt/chroma",
    "/",
    "/mnt/../etc",
    "a: b",
    "- x",
    "#",
    "\n",
    "\t",
    "é",
    "\u{2028}",
    "{{",
    "~",
    "null",
    "*a",
    "&a",
    "true",
    "8000",
    "ghcr.io/chroma-core/chroma:1.5.9",
];

fn text_value() -> impl Strategy<Value = String> {
    prop_oneof![prop::sample::select(STRINGS).prop_map(String::from), "[ -~]{0,30}", "(?s).{0,20}",]
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<u64>().prop_map(|n| Value::Number(n.into())),
        prop::sample::select(&[0i64, -1, 1, 599, 600, 3653, 20, 21, 300, 301, 65535, 65536, 4_294_967_296][..]).prop_map(|n| Value::Number(n.into())),
        any::<f64>().prop_map(|f| Value::Number(f.into())),
        text_value().prop_map(Value::String),
    ]
}

/// Mapping keys: the schema's names most of the time, sometimes anything, sometimes not a string.
fn key() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => prop::sample::select(TOKENS).prop_filter("a word", |t| t.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())).prop_map(|t| Value::String(t.into())),
        2 => text_value().prop_map(Value::String),
        1 => scalar(),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Sequence),
            prop::collection::vec((key(), inner), 0..4).prop_map(|kv| Value::Mapping(kv.into_iter().collect())),
        ]
    })
}

/// A valid config with every kind of node filled in: optional strings, an env map, a list.
fn rich_config() -> Config {
    let mut c = Config { region: Some("eu-west-1".into()), ..Config::default() };
    c.chroma.digest = Some(format!("sha256:{}", "ab".repeat(32)));
    c.chroma.env = BTreeMap::from([("ALLOW_RESET".into(), "TRUE".into()), ("CHROMA_LOG_LEVEL".into(), "INFO".into())]);
    c.efs.file_system_id = Some("fs-0123456789abcdef0".into());
    c.stack.name = Some("vectordb-prod".into());
    c.stack.allowed_client_cidr = Some("10.20.0.0/16".into());
    c.bake.base_ami = Some("ami-0123456789abcdef0".into());
    c.bake.instance_type = Some("m7g.large".into());
    c.bake.regions = vec!["us-west-2".into(), "eu-central-1".into()];
    c
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(Value),
    Index(usize),
}

/// Every node's path, the root's (empty) first.
fn node_paths(v: &Value, prefix: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    out.push(prefix.clone());
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                prefix.push(Seg::Key(k.clone()));
                node_paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Sequence(s) => {
            for (i, child) in s.iter().enumerate() {
                prefix.push(Seg::Index(i));
                node_paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn node_mut<'a>(v: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    let Some((first, rest)) = path.split_first() else { return Some(v) };
    let child = match (first, v) {
        (Seg::Key(k), Value::Mapping(m)) => m.get_mut(k)?,
        (Seg::Index(i), Value::Sequence(s)) => s.get_mut(*i)?,
        _ => return None,
    };
    node_mut(child, rest)
}

#[derive(Debug, Clone)]
enum Mutation {
    Replace(Index, Value),
    Remove(Index),
    Insert(Index, Value, Value),
    WrapInList(Index),
    WrapInMapping(Index, Value),
    Stringify(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), value()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        2 => any::<Index>().prop_map(Mutation::Remove),
        2 => (any::<Index>(), key(), value()).prop_map(|(i, k, v)| Mutation::Insert(i, k, v)),
        1 => any::<Index>().prop_map(Mutation::WrapInList),
        1 => (any::<Index>(), key()).prop_map(|(i, k)| Mutation::WrapInMapping(i, k)),
        1 => any::<Index>().prop_map(Mutation::Stringify),
    ]
}

fn apply(root: &mut Value, m: &Mutation) {
    let mut paths = Vec::new();
    node_paths(root, &mut Vec::new(), &mut paths);
    let pick = |i: &Index| i.get(&paths).clone();
    match m {
        Mutation::Replace(i, v) => *node_mut(root, &pick(i)).unwrap() = v.clone(),
        Mutation::Remove(i) => {
            let path = pick(i);
            if let Some((last, parent)) = path.split_last() {
                match (last, node_mut(root, parent).unwrap()) {
                    (Seg::Key(k), Value::Mapping(m)) => {
                        m.remove(k);
                    }
                    (Seg::Index(i), Value::Sequence(s)) => {
                        s.remove(*i);
                    }
                    _ => unreachable!("paths follow the tree"),
                }
            }
        }
        Mutation::Insert(i, k, v) => match node_mut(root, &pick(i)).unwrap() {
            Value::Mapping(m) => {
                m.insert(k.clone(), v.clone());
            }
            Value::Sequence(s) => s.push(v.clone()),
            other => *other = v.clone(),
        },
        Mutation::WrapInList(i) => {
            let node = node_mut(root, &pick(i)).unwrap();
            *node = Value::Sequence(vec![node.clone()]);
        }
        Mutation::WrapInMapping(i, k) => {
            let node = node_mut(root, &pick(i)).unwrap();
            *node = Value::Mapping([(k.clone(), node.clone())].into_iter().collect());
        }
        Mutation::Stringify(i) => {
            let node = node_mut(root, &pick(i)).unwrap();
            let text = serde_yaml::to_string(node).unwrap_or_default();
            *node = Value::String(text.trim_end().to_string());
        }
    }
}

/// Edits to the text itself: what a hand (or a bad merge) does to a file.
#[derive(Debug, Clone)]
enum Edit {
    Insert(Index, &'static str),
    DeleteChar(Index),
    DuplicateLine(Index),
    DeleteLine(Index),
    Truncate(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<Index>(), prop::sample::select(&["\t", " ", "  ", "\n", ":", "- ", "#", "'", "\"", "[", "{", "&a ", "*a", "\r", "é"][..]))
            .prop_map(|(i, s)| Edit::Insert(i, s)),
        2 => any::<Index>().prop_map(Edit::DeleteChar),
        2 => any::<Index>().prop_map(Edit::DuplicateLine),
        1 => any::<Index>().prop_map(Edit::DeleteLine),
        1 => any::<Index>().prop_map(Edit::Truncate),
    ]
}

fn apply_edit(text: &mut String, e: &Edit) {
    let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
    let mut lines: Vec<String> = text.split_inclusive('\n').map(String::from).collect();
    match e {
        Edit::Insert(i, s) => text.insert_str(*i.get(&bounds), s),
        Edit::DeleteChar(i) => {
            let at = *i.get(&bounds);
            if at < text.len() {
                text.remove(at);
            }
        }
        Edit::Truncate(i) => text.truncate(*i.get(&bounds)),
        Edit::DuplicateLine(i) if !lines.is_empty() => {
            let n = i.index(lines.len());
            let line = lines[n].clone();
            lines.insert(n, if line.ends_with('\n') { line } else { format!("{line}\n") });
            *text = lines.concat();
        }
        Edit::DeleteLine(i) if !lines.is_empty() => {
            lines.remove(i.index(lines.len()));
            *text = lines.concat();
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(settings(256))]

    #[test]
    fn fuzz_parse_arbitrary_text(text in "(?s).{0,400}") {
        parse_holds(&text)?;
    }

    #[test]
    fn fuzz_parse_yaml_token_soup(text in token_soup()) {
        parse_holds(&text)?;
    }

    #[test]
    fn fuzz_parse_mutated_config(mutations in prop::collection::vec(mutation(), 1..5), edits in prop::collection::vec(edit(), 0..3)) {
        let mut root = serde_yaml::to_value(rich_config()).unwrap();
        for m in &mutations {
            apply(&mut root, m);
        }
        // Complex keys (a list as a key) may not serialise; those inputs prove nothing here.
        let Ok(mut text) = serde_yaml::to_string(&root) else { return Ok(()) };
        for e in &edits {
            apply_edit(&mut text, e);
        }
        parse_holds(&text)?;
    }

    #[test]
    fn fuzz_parse_edited_starter(edits in prop::collection::vec(edit(), 1..6)) {
        let mut text = config::STARTER.to_string();
        for e in &edits {
            apply_edit(&mut text, e);
        }
        parse_holds(&text)?;
    }
}

/// Leaves of the rich config as (dotted field, path): `chroma.port`, `bake.regions[1]`.
fn leaves() -> Vec<(String, Vec<Seg>)> {
    let root = serde_yaml::to_value(rich_config()).unwrap();
    let mut paths = Vec::new();
    node_paths(&root, &mut Vec::new(), &mut paths);
    let mut root = root;
    paths
        .into_iter()
        .filter(|p| !matches!(node_mut(&mut root, p), Some(Value::Mapping(_) | Value::Sequence(_))))
        .map(|p| {
            let mut field = String::new();
            for seg in &p {
                match seg {
                    Seg::Key(k) => {
                        if !field.is_empty() {
                            field.push('.');
                        }
                        field.push_str(k.as_str().unwrap());
                    }
                    Seg::Index(i) => field.push_str(&format!("[{i}]")),
                }
            }
            (field, p)
        })
        .collect()
}

/// A value no field of the schema takes.
fn wrong() -> Value {
    serde_yaml::from_str("{zz_fuzz: [1]}").unwrap()
}

/// The line of `field`'s last key in `text` must be the one the error names.
fn assert_names(err: &imgbuild::error::ConfigErrors, text: &str, field: &str) {
    let e = err
        .errors
        .iter()
        .find(|e| e.field == field || e.field.starts_with(&format!("{field}.")) || e.field.starts_with(&format!("{field}[")))
        .unwrap_or_else(|| panic!("no error names {field}:\n{err}\n{text}"));
    let line = e.line.unwrap_or_else(|| panic!("the error on {field} has no line:\n{err}"));
    let key = field.rsplit('.').next().unwrap().split('[').next().unwrap();
    let at = text.lines().nth(line - 1).unwrap_or_default().trim_start();
    // A list item is named by its own line (`- ...`); its list's key line is accepted too, as
    // the nearest line yaml_lines knew for items that are mappings.
    let ok = at.starts_with(&format!("{key}:")) || (field.ends_with(']') && at.starts_with("- "));
    assert!(ok, "{field}: line {line} is `{at}`, not its key `{key}`:\n{err}\n{text}");
}

/// Every leaf of the schema, given a value of the wrong type, is named by the error with the
/// line of its key; so is an unknown key inserted into every mapping.
#[test]
fn fuzz_every_field_with_a_wrong_type_is_named_with_its_line() {
    let base = serde_yaml::to_value(rich_config()).unwrap();
    for (field, path) in leaves() {
        let mut root = base.clone();
        *node_mut(&mut root, &path).unwrap() = wrong();
        let text = serde_yaml::to_string(&root).unwrap();
        let err = config::parse(&text, "f.yaml").expect_err(&field);
        assert_names(&err, &text, &field);
    }
    let mut paths = Vec::new();
    node_paths(&base, &mut Vec::new(), &mut paths);
    for path in paths {
        let mut root = base.clone();
        let Some(Value::Mapping(m)) = node_mut(&mut root, &path) else { continue };
        m.insert(Value::String("zz_fuzz".into()), Value::Sequence(vec![Value::Number(1.into())]));
        let text = serde_yaml::to_string(&root).unwrap();
        let err = config::parse(&text, "f.yaml").expect_err("an unknown key");
        let parent = leaves_field(&path);
        let field = if parent.is_empty() { "zz_fuzz".to_string() } else { format!("{parent}.zz_fuzz") };
        assert_names(&err, &text, &field);
    }
}

fn leaves_field(path: &[Seg]) -> String {
    path.iter()
        .map(|s| match s {
            Seg::Key(k) => k.as_str().unwrap().to_string(),
            Seg::Index(i) => format!("[{i}]"),
        })
        .collect::<Vec<_>>()
        .join(".")
        .replace(".[", "[")
}

proptest! {
    #![proptest_config(settings(128))]

    /// Wrong fields in different sections are all reported together, each with its own line.
    #[test]
    fn fuzz_errors_in_several_sections_are_all_reported(picks in prop::collection::vec(any::<Index>(), 1..9)) {
        let leaves = leaves();
        let mut by_section: BTreeMap<String, Vec<&(String, Vec<Seg>)>> = BTreeMap::new();
        for leaf in &leaves {
            by_section.entry(leaf.0.split(['.', '[']).next().unwrap().to_string()).or_default().push(leaf);
        }
        let sections: Vec<_> = by_section.values().collect();
        let mut chosen: BTreeMap<usize, &(String, Vec<Seg>)> = BTreeMap::new();
        for (n, pick) in picks.iter().enumerate() {
            let s = (pick.index(sections.len()) + n) % sections.len();
            chosen.entry(s).or_insert_with(|| *pick.get(sections[s]));
        }
        let mut root = serde_yaml::to_value(rich_config()).unwrap();
        for (_, path) in chosen.values() {
            *node_mut(&mut root, path).unwrap() = wrong();
        }
        let text = serde_yaml::to_string(&root).unwrap();
        let err = config::parse(&text, "f.yaml").expect_err("wrong fields");
        prop_assert_eq!(err.errors.len(), chosen.len(), "{}", err);
        for (field, _) in chosen.values() {
            assert_names(&err, &text, field);
        }
    }
}

// --- the renderer's properties --------------------------------------------------------------

/// A pinned release from one of the supported ranges, sometimes written with a `v`.
fn chroma_version() -> impl Strategy<Value = String> {
    let plain = prop_oneof![
        Just("0.4.13".to_string()),
        (0u32..=24).prop_map(|p| format!("0.4.{p}")),
        (0u32..=15).prop_map(|p| format!("0.5.{p}")),
        (16u32..=23).prop_map(|p| format!("0.5.{p}")),
        (0u32..=6).prop_map(|p| format!("0.6.{p}")),
        (0u32..=9, 0u32..=20).prop_map(|(m, p)| format!("1.{m}.{p}")),
        (1u32..=3).prop_map(|n| format!("1.0.0-rc.{n}")),
    ];
    (plain, any::<bool>()).prop_map(|(v, prefixed)| if prefixed { format!("v{v}") } else { v })
}

fn region() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(&["us-east-1", "eu-west-1", "ap-southeast-5", "us-gov-west-1", "il-central-1"][..]).prop_map(String::from),
        "[a-z]{2}-[a-z]{4,9}-[1-9]",
    ]
}

/// Env names that pass the check: not secret-looking, not set by imgbuild.
fn env_key() -> impl Strategy<Value = String> {
    "[A-Z_][A-Z0-9_]{0,24}".prop_filter("not a secret or reserved name", |k| {
        let secretish = ["TOKEN", "PASSWORD", "PASSWD", "SECRET", "CREDENTIAL", "PRIVATE_KEY", "API_KEY", "ACCESS_KEY"];
        !secretish.iter().any(|s| k.contains(s)) && !["IS_PERSISTENT", "PERSIST_DIRECTORY", "CHROMA_PERSIST_PATH"].contains(&k.as_str())
    })
}

/// Nothing the secret scan or the baked-boot download check would rightly flag.
#[allow(clippy::ptr_arg)] // proptest's prop_filter hands the strategy's `&String`
fn harmless(v: &String) -> bool {
    ["https://", "dnf ", "docker pull", "AKIA", "ASIA", "-----BEGIN", "aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
        .iter()
        .all(|p| !v.contains(p))
}

/// Env maps: mostly a few printable values (quotes, `$`, `#`, `:` and all, some non-ASCII);
/// sometimes enough text to pass the 16 KB limit raw, or even gzipped.
fn env_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    let small = prop_oneof![4 => "[ -~]{0,40}", 1 => "[ -~éß€\u{2028}]{0,80}"].prop_filter("harmless", harmless);
    let large = "[a-z ]{100,700}".prop_filter("harmless", harmless);
    let noise = "[!-~]{400,700}".prop_filter("harmless", harmless);
    prop_oneof![
        4 => prop::collection::btree_map(env_key(), small, 0..8),
        1 => prop::collection::btree_map(env_key(), large, 8..28),
        1 => prop::collection::btree_map(env_key(), noise, 24..40),
    ]
}

fn mount_point() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,12}", 1..4)
        .prop_filter("no `..`", |parts| parts.iter().all(|p| p != ".."))
        .prop_map(|parts| format!("/{}", parts.join("/")))
}

fn valid_config() -> impl Strategy<Value = Config> {
    (
        (
            chroma_version(),
            1024u16..=65535,
            any::<bool>(),
            prop::option::of("[0-9a-f]{64}"),
            prop::option::of(prop_oneof!["[0-9a-f]{8}", "[0-9a-f]{17}"]),
            prop::option::of(region()),
        ),
        (env_map(), mount_point(), prop::sample::select(&["ghcr.io/chroma-core/chroma", "chromadb/chroma", "localhost:5000/mirror/chroma"][..])),
    )
        .prop_map(|((version, port, nfs, digest, fs, region), (env, mount, image))| {
            let mut c = Config::default();
            c.chroma.version = version;
            c.chroma.port = port;
            c.chroma.image = image.into();
            c.chroma.digest = digest.map(|d| format!("sha256:{d}"));
            c.chroma.env = env;
            c.storage.mode = if nfs { StorageMode::DockerNfs } else { StorageMode::EfsTls };
            c.storage.mount_point = mount;
            c.efs.file_system_id = fs.map(|f| format!("fs-{f}"));
            c.region = region;
            c
        })
}

/// The integers in a check's detail, in order.
fn numbers(text: &str) -> Vec<usize> {
    text.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()
}

proptest! {
    #![proptest_config(settings(64))]

    #[test]
    fn fuzz_render_valid_configs(generated in valid_config(), region_flag in prop::option::of(region())) {
        // What the user writes: the generated config as YAML, read back by the real parser.
        let text = serde_yaml::to_string(&generated).unwrap();
        let config = match config::parse(&text, "gen.yaml") {
            Ok(c) => c,
            Err(e) => return Err(TestCaseError::fail(format!("a valid config is refused: {e}\n{text}"))),
        };
        prop_assert_eq!(&config, &generated);
        let region = region_flag.as_deref().or(config.region.as_deref());
        for mode in [Mode::Full, Mode::Baked] {
            for format in [Format::CloudConfig, Format::Mime] {
                for gzip in [false, true] {
                    let what = format!("{}/{}/gzip={gzip}", mode.as_str(), format.as_str());
                    let inputs = Inputs::new(&config, region, mode, format, gzip).expect("a checked config has a profile");
                    let r = render::render(&inputs).expect("renders");
                    let again = render::render(&inputs).expect("renders");
                    prop_assert!(r.output == again.output && r.raw == again.raw, "{}: two renders differ", what);
                    prop_assert!(gzip || r.output == r.raw, "{}: not gzipped, yet the output is not the raw user-data", what);

                    let report = validate::validate(&r, &config, inputs.profile, Tools::Off);
                    let size = report.checks.iter().find(|c| c.name == "size").expect("a size check");
                    let n = numbers(&size.detail);
                    let fits = r.output.len() <= USERDATA_LIMIT;
                    prop_assert_eq!(size.status == Status::Pass, fits, "{}: {} bytes sent: {:?}", what, r.output.len(), size);
                    if fits {
                        // "N bytes of 16384, margin M" or "N bytes gzipped (R raw) of 16384, margin M".
                        prop_assert_eq!(n[0], r.output.len(), "{}: {}", what, size.detail);
                        prop_assert_eq!(*n.last().unwrap(), USERDATA_LIMIT - r.output.len(), "{}: {}", what, size.detail);
                        if gzip {
                            prop_assert_eq!(n[1], r.raw.len(), "{}: {}", what, size.detail);
                        }
                    } else {
                        // "R bytes is over ... with --gzip it is G bytes" or "R bytes (G gzipped) is over ...".
                        prop_assert_eq!(n[0], r.raw.len(), "{}: {}", what, size.detail);
                        let gz = if gzip { r.output.len() } else { render::gzip(&r.raw).len() };
                        prop_assert!(n.contains(&gz), "{}: the compressed size {} is not stated: {}", what, gz, size.detail);
                    }
                    prop_assert!(r.raw.len() <= USERDATA_LIMIT || gzip || size.status == Status::Fail, "{}: over the limit, and passed", what);
                    for c in &report.checks {
                        prop_assert!(c.status != Status::Fail || c.name == "size", "{}: check {} failed: {}", what, c.name, c.detail);
                    }
                    if mode == Mode::Baked {
                        let raw = String::from_utf8_lossy(&r.raw);
                        for word in ["dnf ", "docker pull", "https://"] {
                            prop_assert!(!raw.contains(word), "{}: baked user-data contains `{}`", what, word);
                        }
                    }
                }
            }
        }
    }
}
