//! The architecture, enforced: every module of `src/` imports only from the layers below it
//! (see the list in `src/lib.rs`), so there are no import cycles and render, config and aws never
//! reach up to the command line. Read from the source text, test modules left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Lowest first. A module may import from any module of a lower rank, and from its own folder.
const LAYERS: &[(&str, u8)] = &[
    ("error", 0),
    ("chroma", 0),
    ("config", 1),
    ("render", 2),
    ("check", 3),
    ("ui", 4),
    ("aws", 4),
    ("stack", 5),
    ("bake", 6),
    ("smoke", 6),
    ("backup", 6),
    ("cost", 6),
    ("cli", 7),
    ("cmd", 8),
];

fn rank(module: &str) -> u8 {
    LAYERS.iter().find(|(m, _)| *m == module).unwrap_or_else(|| panic!("src/{module} is in no layer: add it to LAYERS and src/lib.rs")).1
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Which top-level module each file belongs to, and which others it names as `crate::x`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let module = rel.iter().next().unwrap().to_str().unwrap().trim_end_matches(".rs").to_string();
        if module == "main" || module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        let set = edges.entry(module.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if name != module && !name.is_empty() {
                set.insert(name);
            }
        }
    }
    edges
}

#[test]
fn every_import_points_down_the_layers() {
    let edges = imports();
    assert!(edges.contains_key("cmd") && edges.contains_key("render"), "found the modules: {edges:?}");
    let mut upward = Vec::new();
    for (from, tos) in &edges {
        for to in tos {
            if rank(to) >= rank(from) {
                upward.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(upward.is_empty(), "imports that do not point to a lower layer: {upward:?}");
}

#[test]
fn the_layer_scan_finds_the_real_imports() {
    // The check above would pass vacuously if the scan found nothing: it sees the real edges.
    let edges = imports();
    assert!(edges["cmd"].contains("stack") && edges["render"].contains("config"), "{edges:?}");
    assert!(rank("config") < rank("render") && rank("render") < rank("cli"));
}

#[test]
fn every_folder_says_what_it_owns() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            let text = std::fs::read_to_string(p.join("mod.rs")).unwrap();
            assert!(text.starts_with("//! "), "{}/mod.rs has no module comment", p.display());
        }
    }
}
