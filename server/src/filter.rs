//! containerd's filter syntax, as containerd sends it to a snapshotter's List:
//!
//! ```text
//! filter   := selector ("," selector)*            (AND)
//! selector := fieldpath [operator value]           (no operator: the field is present)
//! fieldpath:= field ("." field)*
//! field    := identifier | quoted
//! operator := "==" | "!="
//! value    := quoted | everything up to the next ","
//! quoted   := "..." (with \" \\ \n \t \r escapes) | /.../ | |...|
//! ```
//!
//! Several filter strings are OR'ed. Snapshot fields: `name`, `parent`, `kind`
//! (`active`/`view`/`committed`) and `labels.<key>` (keys with dots quoted:
//! `labels."containerd.io/snapshot.ref"`). Matching follows containerd's `filters` package
//! and its snapshot adaptor (docs/containerd-semantics.md): `name`, `parent` and `kind` are
//! always present; an unknown field or a missing label is absent, which fails a presence
//! test and `==`, but passes `!=` (containerd compares it as "").
//! containerd's `~=` (regular expressions) is not supported: it is refused as invalid.

use std::collections::HashMap;

use thiserror::Error;

/// Filter strings per List (OR'ed); containerd sends one or two.
pub const MAX_FILTERS: usize = 64;
/// Bytes of all filter strings of one List: room for a 1 KiB label key and a 4 KiB value in
/// each of several filters.
pub const MAX_FILTER_BYTES: usize = 64 << 10;
/// Selectors (`a==b`) in all filters of one List: each one is checked against every
/// snapshot.
pub const MAX_SELECTORS: usize = 256;
/// Parts of one field path (`labels.a.b` has 3).
pub const MAX_PATH_DEPTH: usize = 32;
/// Bytes of a client's filter quoted back in an error.
pub const ECHO_LIMIT: usize = 128;

/// `f`, cut to [`ECHO_LIMIT`] bytes (at a character boundary) with its length noted.
fn echo(f: &str) -> String {
    if f.len() <= ECHO_LIMIT {
        return f.to_string();
    }
    let mut end = ECHO_LIMIT;
    while !f.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &f[..end], f.len())
}

/// ` "<filter>"`, or nothing for an error about all filters together (`filter` empty).
fn quoted(filter: &str) -> String {
    if filter.is_empty() {
        String::new()
    } else {
        format!(" {filter:?}")
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("filter{}: {message}", quoted(.filter))]
pub struct FilterError {
    pub filter: String,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Present,
    Eq,
    Ne,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Selector {
    path: Vec<String>,
    op: Op,
    value: String,
}

/// The fields of one snapshot, as filters see them.
pub struct Fields<'a> {
    pub name: &'a str,
    pub parent: &'a str,
    pub kind: &'a str,
    pub labels: &'a HashMap<String, String>,
}

impl Fields<'_> {
    /// The field at `path`, `None` if absent: as containerd's `snapshots/storage` adaptor
    /// (`adaptSnapshot` in bolt.go), `name`, `parent` and `kind` are always present (an
    /// empty parent too), and only the first element of the path is looked at for them;
    /// `labels.<key>` is present when the label is.
    fn get(&self, path: &[String]) -> Option<&str> {
        let (first, rest) = path.split_first()?;
        match first.as_str() {
            "name" => Some(self.name),
            "parent" => Some(self.parent),
            "kind" => Some(self.kind),
            "labels" => self.labels.get(&rest.join(".")).map(|s| &**s),
            _ => None,
        }
    }
}

/// A parsed list of filters: matches when any filter matches (no filters: everything).
#[derive(Clone, Debug, Default)]
pub struct Filters(Vec<Vec<Selector>>);

impl Filters {
    /// Parses `filters`, within the bounds that keep a List's cost small ([`MAX_FILTERS`],
    /// [`MAX_FILTER_BYTES`], [`MAX_SELECTORS`], [`MAX_PATH_DEPTH`]). Errors quote at most
    /// [`ECHO_LIMIT`] bytes of the client's filter.
    pub fn parse<S: AsRef<str>>(filters: &[S]) -> Result<Filters, FilterError> {
        let too_big = |message: String| FilterError {
            filter: String::new(),
            message,
        };
        if filters.len() > MAX_FILTERS {
            return Err(too_big(format!(
                "{} filters; the limit is {MAX_FILTERS}",
                filters.len()
            )));
        }
        let bytes: usize = filters.iter().map(|f| f.as_ref().len()).sum();
        if bytes > MAX_FILTER_BYTES {
            return Err(too_big(format!(
                "filters of {bytes} bytes; the limit is {MAX_FILTER_BYTES}"
            )));
        }
        let mut out = Vec::new();
        let mut selectors = 0;
        for f in filters {
            let f = f.as_ref();
            let err = |message| FilterError {
                filter: echo(f),
                message,
            };
            let sels = parse_one(f).map_err(err)?;
            selectors += sels.len();
            if selectors > MAX_SELECTORS {
                return Err(too_big(format!(
                    "more than {MAX_SELECTORS} selectors in all"
                )));
            }
            if let Some(s) = sels.iter().find(|s| s.path.len() > MAX_PATH_DEPTH) {
                return Err(err(format!(
                    "a field path of {} parts; the limit is {MAX_PATH_DEPTH} (quote label keys \
                     that contain dots)",
                    s.path.len()
                )));
            }
            out.push(sels);
        }
        Ok(Filters(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, fields: &Fields<'_>) -> bool {
        self.0.is_empty()
            || self.0.iter().any(|sels| {
                // containerd's filters: "!=" compares an absent field as "" (so it is true
                // for an absent field unless the value is empty); "==" needs the field.
                sels.iter().all(|s| match (s.op, fields.get(&s.path)) {
                    (Op::Present, v) => v.is_some(),
                    (Op::Eq, v) => v == Some(s.value.as_str()),
                    (Op::Ne, v) => v.unwrap_or("") != s.value,
                })
            })
    }
}

struct Scanner<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }
    fn eat(&mut self, t: &str) -> bool {
        if self.s[self.pos..].starts_with(t.as_bytes()) {
            self.pos += t.len();
            true
        } else {
            false
        }
    }

    fn quoted(&mut self) -> Result<String, String> {
        let q = self.peek().ok_or("expected a quoted string")?;
        let start = self.pos;
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(format!("unterminated quoted string at byte {start}")),
                Some(c) if c == q => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') if q == b'"' => {
                    self.pos += 1;
                    let e = self.peek().ok_or("unterminated escape")?;
                    out.push(match e {
                        b'"' => b'"',
                        b'\\' => b'\\',
                        b'n' => b'\n',
                        b't' => b'\t',
                        b'r' => b'\r',
                        b'/' => b'/',
                        other => return Err(format!("unsupported escape \\{}", other as char)),
                    });
                    self.pos += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| "quoted string is not UTF-8".to_string())
    }

    fn field(&mut self) -> Result<String, String> {
        match self.peek() {
            Some(b'"' | b'/' | b'|') => self.quoted(),
            Some(c) if c.is_ascii_alphanumeric() || c == b'_' => {
                let start = self.pos;
                while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == b'_') {
                    self.pos += 1;
                }
                Ok(String::from_utf8_lossy(&self.s[start..self.pos]).into_owned())
            }
            Some(c) => Err(format!(
                "unexpected {:?} at byte {} where a field name was expected",
                c as char, self.pos
            )),
            None => Err("expected a field name".into()),
        }
    }

    fn value(&mut self) -> Result<String, String> {
        self.skip_ws();
        match self.peek() {
            Some(b'"' | b'/' | b'|') => self.quoted(),
            _ => {
                let start = self.pos;
                while !matches!(self.peek(), None | Some(b',')) {
                    self.pos += 1;
                }
                let v = std::str::from_utf8(&self.s[start..self.pos])
                    .map_err(|_| "value is not UTF-8".to_string())?
                    .trim()
                    .to_string();
                if v.is_empty() {
                    return Err(format!("missing value at byte {start}"));
                }
                if v.contains(['"', '=']) {
                    return Err(format!("value {v:?} must be quoted"));
                }
                Ok(v)
            }
        }
    }
}

fn parse_one(f: &str) -> Result<Vec<Selector>, String> {
    let mut sc = Scanner {
        s: f.as_bytes(),
        pos: 0,
    };
    let mut sels = Vec::new();
    sc.skip_ws();
    if sc.peek().is_none() {
        return Ok(sels); // an empty filter matches everything
    }
    loop {
        sc.skip_ws();
        let mut path = vec![sc.field()?];
        while sc.eat(".") {
            path.push(sc.field()?);
        }
        sc.skip_ws();
        let op = if sc.eat("==") {
            Op::Eq
        } else if sc.eat("!=") {
            Op::Ne
        } else if sc.eat("~=") {
            return Err("regular-expression filters (~=) are not supported".into());
        } else {
            Op::Present
        };
        let value = if op == Op::Present {
            String::new()
        } else {
            sc.value()?
        };
        sels.push(Selector { path, op, value });
        sc.skip_ws();
        match sc.peek() {
            None => return Ok(sels),
            Some(b',') => sc.pos += 1,
            Some(c) => {
                return Err(format!(
                    "unexpected {:?} at byte {}: expected \",\" or an operator (== or !=)",
                    c as char, sc.pos
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields<'a>(
        name: &'a str,
        parent: &'a str,
        kind: &'a str,
        labels: &'a HashMap<String, String>,
    ) -> Fields<'a> {
        Fields {
            name,
            parent,
            kind,
            labels,
        }
    }

    #[test]
    fn containerd_filters() {
        let mut labels = HashMap::new();
        labels.insert(
            "containerd.io/snapshot.ref".to_string(),
            "sha256:abc".into(),
        );
        labels.insert("a".to_string(), "1".into());
        let f = fields("default/3/x", "default/2/p", "committed", &labels);
        let yes = [
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent==default/2/p"#,
            "name==default/3/x",
            r#"name=="default/3/x""#,
            "kind==committed",
            "kind!=active",
            "labels.a",
            "labels.a==1, kind==committed",
            "parent",
            "",
        ];
        for s in yes {
            assert!(
                Filters::parse(&[s]).unwrap().matches(&f),
                "{s} should match"
            );
        }
        let no = [
            "kind==active",
            "labels.b",
            "labels.a==1,kind==view",
            "nosuchfield==x",
            "nosuchfield",
            r#"labels."containerd.io/snapshot.ref"==sha256:abd"#,
        ];
        for s in no {
            assert!(!Filters::parse(&[s]).unwrap().matches(&f), "{s} matched");
        }
        // OR across filter strings.
        assert!(
            Filters::parse(&["kind==active", "kind==committed"])
                .unwrap()
                .matches(&f)
        );
        assert!(Filters::parse::<&str>(&[]).unwrap().matches(&f));
        // containerd: "!=" on an absent field compares "" with the value.
        for s in ["labels.b!=1", "nosuchfield!=x", r#"labels."x.y"!=z"#] {
            assert!(
                Filters::parse(&[s]).unwrap().matches(&f),
                "{s} should match"
            );
        }
        // An empty parent is present (containerd's adaptor always reports it) and is "".
        let top = fields("k", "", "active", &labels);
        assert!(Filters::parse(&["parent"]).unwrap().matches(&top));
        assert!(Filters::parse(&["parent!=x"]).unwrap().matches(&top));
        assert!(!Filters::parse(&["parent==x"]).unwrap().matches(&top));
    }

    #[test]
    fn bad_syntax_is_refused() {
        for s in [
            "name~=abc",
            "name==",
            "name=x",
            "==x",
            r#"labels."unterminated==x"#,
            "labels.a==\"x\"y",
            "name==a,",
            ".name==a",
        ] {
            assert!(Filters::parse(&[s]).is_err(), "{s} parsed");
        }
    }
}
