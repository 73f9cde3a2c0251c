//! `.dockerignore` patterns, as Docker and BuildKit match them (moby/patternmatcher), for
//! `COPY --exclude` and the [checksum](crate::checksum).
//!
//! A pattern is cleaned first: surrounding white space is trimmed, a leading `!` makes it an
//! exception, then the path is cleaned lexically (`//` and `.` components dropped, `..`
//! resolved, a trailing `/` removed) and a leading `/` removed, so `/opt/`, `./opt` and `opt`
//! are one pattern. An empty pattern is skipped; `!` alone is refused.
//!
//! The syntax is Go's `filepath.Match`: `*` is any run of characters but `/`, `?` any one
//! character but `/`, `[...]` a class (ranges `a-z`, negation with a leading `^` or `!`, `\`
//! escapes inside), `\x` the character `x`. A class never matches `/`. On top of that, `**`
//! matches any number of directories: `**/` (or `**` not at the end) matches nothing or any
//! run of characters ending in `/`, and a trailing `**` matches anything (`/` included).
//!
//! A path is matched by a pattern when the pattern matches the path or one of its parent
//! directories, so a pattern that names a directory takes everything below it. The last
//! pattern that matches a path decides: an exclusion excludes it, an exception (`!`)
//! includes it again. The root itself (the empty path) is never excluded.

use crate::error::{Error, Result};

/// A compiled list of `.dockerignore` patterns (see the [module docs](self)).
#[derive(Debug, Clone, Default)]
pub struct Patterns {
    list: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Pattern {
    /// `!pattern`: re-includes what it matches.
    exception: bool,
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// A literal character.
    Lit(char),
    /// `?`: one character but `/`.
    Any,
    /// `*`: any run of characters but `/`.
    Star,
    /// `[...]`: one character (never `/`) in (or, negated, not in) the ranges.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// `**` (or `**/`) not at the end: nothing, or anything that ends with `/`.
    AnyDirs,
    /// A trailing `**`: anything.
    Rest,
}

impl Patterns {
    /// Compiles `patterns`, in order (the last one that matches a path decides). A malformed
    /// pattern (an unclosed or empty class, a trailing `\`, `!` alone) is an
    /// [`Error::InvalidArgument`] naming it.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Patterns> {
        let mut list = Vec::new();
        for p in patterns {
            let raw = p.as_ref();
            let mut text = raw.trim();
            if text.is_empty() {
                continue;
            }
            let exception = text.starts_with('!');
            if exception {
                text = text[1..].trim_start();
                if text.is_empty() {
                    return Err(Error::invalid(
                        format!("pattern {raw:?}"),
                        "an exception ('!') needs a pattern after it",
                    ));
                }
            }
            let cleaned = clean(text);
            let tokens = parse(&cleaned)
                .map_err(|reason| Error::invalid(format!("pattern {raw:?}"), reason))?;
            list.push(Pattern { exception, tokens });
        }
        Ok(Patterns { list })
    }

    /// True when there are no patterns: nothing is excluded.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Whether `rel` (a path relative to the source root, components joined by `/`, no
    /// leading `/`) is excluded: the last pattern that matches it or one of its parent
    /// directories is an exclusion. `is_dir` says whether `rel` is a directory; Docker's
    /// patterns match files and directories alike (a trailing `/` is cleaned away), so it
    /// does not change the answer today, but walkers pass it so that the signature can carry
    /// directory-only syntax without changing callers.
    pub fn excluded(&self, rel: &str, is_dir: bool) -> bool {
        let _ = is_dir;
        self.last_match(rel.trim_matches('/'))
            .is_some_and(|i| !self.list[i].exception)
    }

    /// Whether anything below directory `rel_dir` may be included: false only when the
    /// directory is excluded and no exception pattern after the one that excluded it could
    /// match a path below it. A walker may then skip the whole subtree.
    pub fn may_include_below(&self, rel_dir: &str) -> bool {
        let rel_dir = rel_dir.trim_matches('/');
        let Some(last) = self.last_match(rel_dir) else {
            return true;
        };
        if self.list[last].exception {
            return true;
        }
        let prefix = format!("{rel_dir}/");
        self.list[last + 1..]
            .iter()
            .any(|p| p.exception && p.may_match_extension(&prefix))
    }

    /// The index of the last pattern that matches `rel` or one of its parents.
    fn last_match(&self, rel: &str) -> Option<usize> {
        if rel.is_empty() {
            return None;
        }
        self.list.iter().rposition(|p| {
            p.matches(rel)
                || rel
                    .char_indices()
                    .filter(|&(_, c)| c == '/')
                    .any(|(i, _)| p.matches(&rel[..i]))
        })
    }
}

/// Go's `path.Clean`, then without a leading `/`; `.` (nothing) becomes the empty string.
fn clean(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

/// One range end inside a class (Go's `getEsc`): not `-` or `]` unescaped, and the class
/// must go on after it.
fn class_char(chars: &[char], i: &mut usize) -> std::result::Result<char, String> {
    let unclosed = || "a character class ('[') is not closed with ']'".to_string();
    let mut c = *chars.get(*i).ok_or_else(unclosed)?;
    if c == '-' || c == ']' {
        return Err(format!(
            "{c:?} in a character class must be escaped or follow a character"
        ));
    }
    if c == '\\' {
        *i += 1;
        c = *chars.get(*i).ok_or_else(unclosed)?;
    }
    *i += 1;
    if *i >= chars.len() {
        return Err(unclosed());
    }
    Ok(c)
}

fn parse(p: &str) -> std::result::Result<Vec<Token>, String> {
    let chars: Vec<char> = p.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                tokens.push(if i >= chars.len() {
                    Token::Rest
                } else {
                    Token::AnyDirs
                });
            }
            '*' => tokens.push(Token::Star),
            '?' => tokens.push(Token::Any),
            '\\' => match chars.get(i) {
                Some(&e) => {
                    i += 1;
                    tokens.push(Token::Lit(e));
                }
                None => return Err("a trailing '\\' escapes nothing".to_string()),
            },
            '[' => {
                let negated = matches!(chars.get(i), Some('^' | '!'));
                if negated {
                    i += 1;
                }
                let mut ranges = Vec::new();
                loop {
                    if chars.get(i) == Some(&']') && !ranges.is_empty() {
                        i += 1;
                        break;
                    }
                    let lo = class_char(&chars, &mut i)?;
                    let mut hi = lo;
                    if chars.get(i) == Some(&'-') {
                        i += 1;
                        hi = class_char(&chars, &mut i)?;
                    }
                    ranges.push((lo, hi));
                }
                tokens.push(Token::Class { negated, ranges });
            }
            c => tokens.push(Token::Lit(c)),
        }
    }
    Ok(tokens)
}

impl Pattern {
    /// Whether the pattern matches all of `s`.
    fn matches(&self, s: &str) -> bool {
        self.run(s)
            .is_some_and(|(normal, _)| normal[self.tokens.len()])
    }

    /// Whether some path that starts with `prefix` could match the pattern.
    fn may_match_extension(&self, prefix: &str) -> bool {
        self.run(prefix).is_some()
    }

    /// Runs the pattern's automaton over `s`: the states alive at the end (positions before
    /// each token, and "inside a `**`" states), or `None` when none is.
    fn run(&self, s: &str) -> Option<(Vec<bool>, Vec<bool>)> {
        let n = self.tokens.len();
        let mut normal = vec![false; n + 1];
        let mut inner = vec![false; n];
        normal[0] = true;
        self.close(&mut normal);
        for c in s.chars() {
            let mut next = vec![false; n + 1];
            let mut next_inner = vec![false; n];
            for (i, t) in self.tokens.iter().enumerate() {
                if inner[i] {
                    next_inner[i] = true;
                    if c == '/' {
                        next[i + 1] = true;
                    }
                }
                if !normal[i] {
                    continue;
                }
                match t {
                    Token::Lit(l) if *l == c => next[i + 1] = true,
                    Token::Any if c != '/' => next[i + 1] = true,
                    Token::Class { negated, ranges } if c != '/' => {
                        let inside = ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi);
                        if inside != *negated {
                            next[i + 1] = true;
                        }
                    }
                    Token::Star if c != '/' => next[i] = true,
                    Token::Rest => next[i] = true,
                    Token::AnyDirs => {
                        next_inner[i] = true;
                        if c == '/' {
                            next[i + 1] = true;
                        }
                    }
                    _ => {}
                }
            }
            self.close(&mut next);
            if !next.iter().chain(next_inner.iter()).any(|b| *b) {
                return None;
            }
            normal = next;
            inner = next_inner;
        }
        Some((normal, inner))
    }

    /// Adds the states reachable without input: past a `*` or `**`, which may match nothing.
    fn close(&self, states: &mut [bool]) {
        for (i, t) in self.tokens.iter().enumerate() {
            if states[i] && matches!(t, Token::Star | Token::AnyDirs | Token::Rest) {
                states[i + 1] = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn pm(p: &[&str]) -> Patterns {
        Patterns::new(p).unwrap()
    }

    fn ex(p: &[&str], path: &str) -> bool {
        pm(p).excluded(path, false)
    }

    #[test]
    fn docker_example_star_slash_temp() {
        let p = &["*/temp*"];
        assert!(ex(p, "somedir/temporary.txt"));
        assert!(ex(p, "somedir/temp"));
        assert!(ex(p, "somedir/temp/below/file"));
        assert!(!ex(p, "temp"));
        assert!(!ex(p, "temporary.txt"));
        assert!(!ex(p, "a/b/temp"));
    }

    #[test]
    fn docker_example_two_levels_temp() {
        let p = &["*/*/temp*"];
        assert!(ex(p, "somedir/subdir/temporary.txt"));
        assert!(!ex(p, "somedir/temporary.txt"));
        assert!(!ex(p, "a/b/c/temp"));
    }

    #[test]
    fn docker_example_temp_question_mark() {
        let p = &["temp?"];
        assert!(ex(p, "tempa"));
        assert!(ex(p, "tempb/inside"));
        assert!(!ex(p, "temp"));
        assert!(!ex(p, "tempab"));
        assert!(!ex(p, "dir/tempa"));
        assert!(!ex(p, "temp/"));
    }

    #[test]
    fn docker_example_double_star_go() {
        let p = &["**/*.go"];
        assert!(ex(p, "main.go"));
        assert!(ex(p, "a/main.go"));
        assert!(ex(p, "a/b/c/x.go"));
        assert!(!ex(p, "a/b/c/x.gox"));
        assert!(!ex(p, "go"));
    }

    #[test]
    fn docker_example_markdown_with_exception() {
        let p = &["*.md", "!README.md"];
        assert!(ex(p, "CHANGES.md"));
        assert!(!ex(p, "README.md"));
        assert!(!ex(p, "docs/CHANGES.md"), "'*' does not cross '/'");
        // The docs' second example: the last matching pattern wins.
        let p = &["*.md", "!README*.md", "README-secret.md"];
        assert!(ex(p, "CHANGES.md"));
        assert!(!ex(p, "README-other.md"));
        assert!(ex(p, "README-secret.md"));
        let p = &["*.md", "README-secret.md", "!README*.md"];
        assert!(!ex(p, "README-secret.md"));
    }

    #[test]
    fn rooted_directory_takes_everything_below() {
        for pat in ["/opt", "opt", "./opt", "/opt/", "opt//", "/x/../opt"] {
            let p = &[pat];
            assert!(ex(p, "opt"), "{pat}");
            assert!(ex(p, "opt/x/y"), "{pat}");
            assert!(!ex(p, "optional"), "{pat}");
            assert!(!ex(p, "a/opt"), "{pat}");
        }
    }

    #[test]
    fn root_is_never_excluded() {
        assert!(!ex(&["*"], ""));
        assert!(!ex(&["**"], "/"));
        assert!(ex(&["**"], "a/b"));
        assert!(ex(&["*"], "a/b"), "'*' matches the parent 'a'");
    }

    #[test]
    fn double_star_forms() {
        assert!(ex(&["a/**/b"], "a/b"));
        assert!(ex(&["a/**/b"], "a/x/y/b"));
        assert!(!ex(&["a/**/b"], "a/xb"));
        assert!(ex(&["a/**"], "a/x"));
        assert!(!ex(&["a/**"], "a"));
        assert!(ex(&["a**"], "abc/d"));
        assert!(ex(&["**/foo"], "foo"));
        assert!(ex(&["**/foo"], "x/y/foo/z"));
        assert!(!ex(&["**/foo"], "x/barfoo"));
    }

    #[test]
    fn classes_and_escapes() {
        let p = &["file[0-9]"];
        assert!(ex(p, "file7"));
        assert!(!ex(p, "filex"));
        assert!(ex(&["file[^0-9]"], "filex"));
        assert!(ex(&["file[!0-9]"], "filex"));
        assert!(!ex(&["file[!0-9]"], "file1"));
        assert!(!ex(&["a[^x]b"], "a/b"), "a class never matches '/'");
        assert!(ex(&["[\\]a]"], "]"));
        assert!(
            Patterns::new(&["[a-c-]x"]).is_err(),
            "as in Go: '-' after a range"
        );
        assert!(ex(&["[a-c\\-]x"], "-x"));
        assert!(ex(&["\\*"], "*"));
        assert!(!ex(&["\\*"], "x"));
        assert!(ex(&["a\\?"], "a?"));
        assert!(!ex(&["a\\?"], "ab"));
        assert!(ex(&["?"], "é"));
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in [
            "[", "a[", "[]", "[]a]", "[a-", "[-a]", "x\\", "!", " ! ", "[a-]",
        ] {
            let err = Patterns::new(&[bad]).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{bad}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        // Blank lines are skipped.
        assert!(Patterns::new(&["", "  "]).unwrap().is_empty());
    }

    #[test]
    fn exception_reincludes_below_excluded_directory() {
        let p = pm(&["dir", "!dir/keep"]);
        assert!(p.excluded("dir", true));
        assert!(p.excluded("dir/other", false));
        assert!(!p.excluded("dir/keep", false));
        assert!(!p.excluded("dir/keep/deep", false));
        assert!(p.may_include_below("dir"));
        assert!(!pm(&["dir"]).may_include_below("dir"));
        assert!(pm(&["dir"]).may_include_below("other"));
        assert!(pm(&[]).may_include_below("x"));
    }

    #[test]
    fn may_include_below_with_wildcard_exceptions() {
        let p = pm(&["a", "!*/keep"]);
        assert!(p.may_include_below("a"));
        assert!(!p.excluded("a/keep", false));
        assert!(
            !p.may_include_below("a/sub"),
            "'*/keep' cannot match below a/sub"
        );
        assert!(pm(&["a", "!**/keep"]).may_include_below("a/sub"));
        // An exception before the exclusion cannot win below it.
        let p = pm(&["!a/keep", "a"]);
        assert!(p.excluded("a/keep", false));
        assert!(!p.may_include_below("a"));
        // An exception that cannot start with the directory's path.
        assert!(!pm(&["a", "!b/keep"]).may_include_below("a"));
    }

    #[test]
    fn last_match_wins_over_parents() {
        let p = pm(&["a", "!a/b", "a/b/c"]);
        assert!(p.excluded("a/x", false));
        assert!(!p.excluded("a/b/x", false));
        assert!(p.excluded("a/b/c/d", false));
        assert!(!p.may_include_below("a/b/c"));
    }
}
