//! Line numbers for dotted YAML paths.
//!
//! serde_yaml reports a line for the first error of a deserialisation only, and its `Value`
//! keeps no positions. To name the line of *every* error we collect, we walk yaml-rust2's marked
//! event stream once and remember where each key path starts.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Maps `a.b.c` and `a.list[2]` paths to 1-based line numbers.
#[derive(Debug, Default, Clone)]
pub struct LineIndex {
    lines: HashMap<String, usize>,
    /// Keys that appear twice in one mapping: (path, line of the repeat, line of the first).
    pub duplicates: Vec<(String, usize, usize)>,
}

impl LineIndex {
    /// Indexes `text`; a document that does not parse gives an empty index (the YAML error
    /// itself is reported elsewhere, with its own position).
    pub fn new(text: &str) -> Self {
        let mut walker = Walker { text: text.as_bytes().to_vec(), ..Walker::default() };
        let mut parser = Parser::new_from_str(text);
        // A document that stops parsing still yields what was read before the error (duplicate
        // keys, for one, are only a problem for serde).
        let _ = parser.load(&mut walker, false);
        Self { lines: walker.lines, duplicates: walker.duplicates }
    }

    /// The line of `path`, or of its nearest ancestor that exists in the file (a missing field
    /// is best pointed at by the mapping that lacks it).
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut candidate = path.to_string();
        loop {
            if let Some(line) = self.lines.get(&candidate) {
                return Some(*line);
            }
            let cut = candidate.rfind(['.', '['])?;
            candidate.truncate(cut);
        }
    }
}

enum Frame {
    Map {
        path: String,
        key: Option<String>,
    },
    /// `start` is the byte offset where the sequence begins (its first `-` in block style).
    Seq {
        path: String,
        index: usize,
        start: usize,
    },
}

#[derive(Default)]
struct Walker {
    text: Vec<u8>,
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
    duplicates: Vec<(String, usize, usize)>,
}

impl Walker {
    /// The path a value arriving now would have.
    fn value_path(&mut self) -> Option<String> {
        match self.stack.last_mut()? {
            Frame::Map { path, key } => {
                let key = key.take()?;
                Some(if path.is_empty() { key } else { format!("{path}.{key}") })
            }
            Frame::Seq { path, index, .. } => {
                let p = format!("{path}[{index}]");
                *index += 1;
                Some(p)
            }
        }
    }

    /// True when the next scalar in the current mapping is a key.
    fn expecting_key(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { key: None, .. }))
    }

    /// The 1-based line of item `item` of the block sequence starting at byte `start`.
    fn item_line(&self, start: usize, item: usize) -> Option<usize> {
        let start = start.min(self.text.len().saturating_sub(1));
        let line_start = self.text[..start].iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
        // The sequence's mark can sit just past its first `-`: anchor on the dash itself.
        let dash = line_start + self.text[line_start..=start].iter().rposition(|b| *b == b'-')?;
        let column = dash - line_start;
        let first_line = self.text[..start].iter().filter(|b| **b == b'\n').count() + 1;
        let items = self.text[line_start..]
            .split(|b| *b == b'\n')
            .enumerate()
            .filter(|(_, l)| l.get(column) == Some(&b'-') && l.get(column + 1).is_none_or(|c| c.is_ascii_whitespace()));
        items.map(|(i, _)| first_line + i).nth(item)
    }

    fn record(&mut self, path: &str, mark: Marker) {
        self.lines.entry(path.to_string()).or_insert(mark.line());
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(text, ..) if self.expecting_key() => {
                if let Some(Frame::Map { path, .. }) = self.stack.last() {
                    let full = if path.is_empty() { text.clone() } else { format!("{path}.{text}") };
                    if let Some(first) = self.lines.get(&full) {
                        self.duplicates.push((full.clone(), mark.line(), *first));
                    }
                    self.record(&full, mark);
                }
                if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
                    *key = Some(text);
                }
            }
            Event::Scalar(ref text, ..) if text.is_empty() && matches!(self.stack.last(), Some(Frame::Seq { .. })) => {
                // An empty list item (`-` alone) is an implicit null marked where the next token
                // starts. In a block sequence every item's `-` stands in the sequence's column, so
                // item i is on the i-th line with a `-` there.
                let (start, item) = match self.stack.last() {
                    Some(Frame::Seq { start, index, .. }) => (*start, *index),
                    _ => unreachable!("matched a sequence frame"),
                };
                if let Some(path) = self.value_path() {
                    let line = self.item_line(start, item).unwrap_or(mark.line());
                    self.lines.entry(path).or_insert(line);
                }
            }
            Event::Scalar(..) | Event::Alias(..) => {
                if let Some(path) = self.value_path() {
                    self.record(&path, mark);
                }
            }
            Event::MappingStart(..) => {
                let path = self.value_path().unwrap_or_default();
                // A mapping inside a list has no key of its own: its line is where it starts.
                if !path.is_empty() {
                    self.record(&path, mark);
                }
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.value_path().unwrap_or_default();
                if !path.is_empty() {
                    self.record(&path, mark);
                }
                self.stack.push(Frame::Seq { path, index: 0, start: mark.index() });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_falls_back_to_parents() {
        let text = "name: x\nchroma:\n  version: 1.5.9\n  env:\n    A: b\nlist:\n  - one\n  - two\n";
        let idx = LineIndex::new(text);
        assert_eq!(idx.line_of("name"), Some(1));
        assert_eq!(idx.line_of("chroma.version"), Some(3));
        assert_eq!(idx.line_of("chroma.env.A"), Some(5));
        assert_eq!(idx.line_of("chroma.port"), Some(2));
        assert_eq!(idx.line_of("list[1]"), Some(8));
        assert_eq!(idx.line_of("nothing"), None);
    }

    #[test]
    fn list_items_and_duplicates_have_lines() {
        let text = "steps:\n  - name: a\n  - name: b\n    x: 1\nk: 1\nk: 2\n";
        let idx = LineIndex::new(text);
        assert_eq!(idx.line_of("steps[1]"), Some(3));
        assert_eq!(idx.line_of("steps[1].x"), Some(4));
        assert_eq!(idx.duplicates, vec![("k".to_string(), 6, 5)]);
    }
}
