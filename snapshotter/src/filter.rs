//! containerd's filter syntax for [`crate::Snapshotter::walk`].
//!
//! A filter string is a comma-separated list of selectors that must all match; several filter
//! strings match when any of them does. A selector is a field path, optionally followed by an
//! operator and a value:
//!
//! ```text
//! name==build-1
//! parent!=""
//! kind==committed,labels.stage
//! labels."containerd.io/gc.root"==yes
//! ```
//!
//! Field paths: `name`, `parent`, `kind`, `labels.<key>` (a key with dots or slashes is quoted).
//! Operators: `==`, `!=`; a bare field path means "present" (for `parent`: has a parent).
//! Values are bare words (no commas, no white space) or double-quoted strings with Go-style
//! escapes. As in containerd, `==` needs the field to be present (so `parent==""` matches
//! nothing: a snapshot without a parent has no parent field) and `!=` compares with the empty
//! string when the field is absent (so `parent!=""` selects snapshots that have a parent).
//! containerd's regular-expression operator `~=` is refused with an InvalidArgument error
//! rather than silently matching nothing.

use crate::error::{Error, Result};
use crate::types::{Info, Kind};

/// A field a selector looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// The key or name.
    Name,
    /// The parent's name (empty when there is none).
    Parent,
    /// The kind (`active`, `view`, `committed`).
    Kind,
    /// One label.
    Label(String),
}

/// How a selector compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The field is present (non-empty parent, existing label).
    Present,
    /// The field equals the value.
    Equal(String),
    /// The field (empty when absent) differs from the value.
    NotEqual(String),
}

/// One `field op value` term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// What is looked at.
    pub field: Field,
    /// How it is compared.
    pub op: Op,
}

/// A parsed set of filter strings: matches when any conjunction matches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    /// The alternatives; each is a list of selectors that must all match. Empty = match all.
    pub any: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses filter strings; an empty list (or only empty strings) matches everything.
    pub fn parse_all(filters: &[&str]) -> Result<Filter> {
        let mut any = Vec::new();
        for f in filters {
            let all = parse_one(f)?;
            if all.is_empty() {
                // An empty filter string matches everything, which makes the whole OR true.
                return Ok(Filter::default());
            }
            any.push(all);
        }
        Ok(Filter { any })
    }

    /// True when `info` matches (evaluated in memory; the store evaluates the same rules in
    /// SQL).
    pub fn matches(&self, info: &Info) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|s| s.matches(info)))
    }
}

impl Selector {
    /// True when `info` satisfies this selector.
    pub fn matches(&self, info: &Info) -> bool {
        let value: Option<&str> = match &self.field {
            Field::Name => Some(&info.name),
            Field::Parent => info.parent.as_deref().filter(|p| !p.is_empty()),
            Field::Kind => Some(info.kind.as_str()),
            Field::Label(k) => info.labels.get(k).map(String::as_str),
        };
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(v) => value == Some(v.as_str()),
            Op::NotEqual(v) => value.unwrap_or("") != v,
        }
    }
}

fn bad(filter: &str, reason: impl Into<String>) -> Error {
    Error::invalid(format!("filter {filter:?}"), reason)
}

struct Lexer<'a> {
    src: &'a str,
    chars: Vec<char>,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        Lexer {
            src,
            chars: src.chars().collect(),
            pos: 0,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn at_end(&mut self) -> bool {
        self.skip_ws();
        self.pos >= self.chars.len()
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn quoted(&mut self) -> Result<String> {
        // Opening quote already checked by the caller.
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(bad(self.src, "unterminated quoted string")),
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('\\') => {
                    self.pos += 1;
                    let c = self
                        .peek()
                        .ok_or_else(|| bad(self.src, "unterminated escape"))?;
                    self.pos += 1;
                    out.push(match c {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        '\\' => '\\',
                        '"' => '"',
                        '\'' => '\'',
                        '/' => '/',
                        other => {
                            return Err(bad(self.src, format!("unknown escape \\{other}")));
                        }
                    });
                }
                Some(c) => {
                    self.pos += 1;
                    out.push(c);
                }
            }
        }
    }

    fn field(&mut self) -> Result<String> {
        self.skip_ws();
        match self.peek() {
            Some('"') => self.quoted(),
            Some(c) if is_field_char(c) => {
                let start = self.pos;
                while self.peek().is_some_and(is_field_char) {
                    self.pos += 1;
                }
                Ok(self.chars[start..self.pos].iter().collect())
            }
            Some(c) => Err(bad(
                self.src,
                format!("expected a field name at {c:?} (position {})", self.pos),
            )),
            None => Err(bad(self.src, "expected a field name at the end")),
        }
    }

    fn value(&mut self) -> Result<String> {
        self.skip_ws();
        match self.peek() {
            Some('"') => self.quoted(),
            Some(c) if is_value_char(c) => {
                let start = self.pos;
                while self.peek().is_some_and(is_value_char) {
                    self.pos += 1;
                }
                Ok(self.chars[start..self.pos].iter().collect())
            }
            _ => Err(bad(self.src, "expected a value after the operator")),
        }
    }

    fn op(&mut self) -> Result<Option<&'static str>> {
        self.skip_ws();
        let two: String = self.chars[self.pos..].iter().take(2).collect();
        let op = match two.as_str() {
            "==" => "==",
            "!=" => "!=",
            "~=" => "~=",
            _ => return Ok(None),
        };
        self.pos += 2;
        Ok(Some(op))
    }
}

fn is_field_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-'
}

fn is_value_char(c: char) -> bool {
    c != ',' && c != '"' && !c.is_whitespace() && !c.is_control()
}

fn parse_one(src: &str) -> Result<Vec<Selector>> {
    let mut lx = Lexer::new(src);
    let mut out = Vec::new();
    if lx.at_end() {
        return Ok(out);
    }
    loop {
        let mut path = vec![lx.field()?];
        while lx.eat('.') {
            path.push(lx.field()?);
        }
        let field = match path.as_slice() {
            [f] if f == "name" => Field::Name,
            [f] if f == "parent" => Field::Parent,
            [f] if f == "kind" => Field::Kind,
            [f, k] if f == "labels" => Field::Label(k.clone()),
            [f] if f == "labels" => {
                return Err(bad(src, "a label selector needs a key: labels.<key>"));
            }
            _ => {
                return Err(bad(
                    src,
                    format!(
                        "unknown field {:?}: snapshots can be filtered on name, parent, kind and labels.<key> (quote keys with dots: labels.\"a.b/c\")",
                        path.join(".")
                    ),
                ));
            }
        };
        let op = match lx.op()? {
            None => Op::Present,
            Some("==") => Op::Equal(lx.value()?),
            Some("!=") => Op::NotEqual(lx.value()?),
            Some(_) => {
                return Err(bad(
                    src,
                    "the regular-expression operator ~= is not supported; use == or !=",
                ));
            }
        };
        if field == Field::Kind {
            if let Op::Equal(v) | Op::NotEqual(v) = &op {
                v.parse::<Kind>().map_err(|e| bad(src, e))?;
            }
        }
        out.push(Selector { field, op });
        if lx.at_end() {
            return Ok(out);
        }
        if !lx.eat(',') {
            return Err(bad(
                src,
                format!("expected ',' between selectors at position {}", lx.pos),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::SystemTime;

    fn info(name: &str, parent: Option<&str>, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            kind,
            name: name.into(),
            parent: parent.map(Into::into),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn parses_containerd_forms() {
        let f = Filter::parse_all(&[r#"labels."a.b/c"==v 1"#]);
        assert!(f.is_err(), "bare values cannot contain spaces");
        let f = Filter::parse_all(&[r#"labels."a.b/c"=="v 1",kind==active"#]).unwrap();
        assert_eq!(
            f.any,
            vec![vec![
                Selector {
                    field: Field::Label("a.b/c".into()),
                    op: Op::Equal("v 1".into())
                },
                Selector {
                    field: Field::Kind,
                    op: Op::Equal("active".into())
                },
            ]]
        );
        let f = Filter::parse_all(&[r#"parent!="""#]).unwrap();
        assert_eq!(f.any[0][0].op, Op::NotEqual(String::new()));
    }

    #[test]
    fn matches_like_containerd() {
        let a = info("a", None, Kind::Committed, &[("x", "1")]);
        let b = info("b", Some("a"), Kind::Active, &[("a.b/c", "y")]);
        let m = |f: &[&str], i: &Info| Filter::parse_all(f).unwrap().matches(i);
        assert!(m(&["name==a"], &a) && !m(&["name==a"], &b));
        assert!(m(&["parent==a"], &b) && !m(&["parent==a"], &a));
        assert!(m(&[r#"parent!="""#], &b) && !m(&[r#"parent!="""#], &a));
        assert!(m(&["kind==active"], &b) && !m(&["kind==active"], &a));
        assert!(m(&["labels.x"], &a) && !m(&["labels.x"], &b));
        assert!(m(&["labels.x!=2"], &b), "!= matches an absent label");
        assert!(m(&[r#"labels."a.b/c"==y"#], &b));
        assert!(m(&["name==a", "name==b"], &b), "strings are OR'ed");
        assert!(!m(&["name==a,kind==active"], &a), "commas are AND'ed");
        assert!(m(&[], &a) && m(&[""], &b));
    }

    #[test]
    fn rejects_bad_filters_with_the_filter_named() {
        for f in [
            "name==",
            "nmae==a",
            "labels",
            "name~=a.*",
            "kind==bogus",
            "name==a,,",
            "\"unterminated",
            "name==a kind==b",
        ] {
            let err = Filter::parse_all(&[f]).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{f}");
            assert!(err.to_string().contains(&format!("{f:?}")), "{err}");
        }
    }
}
