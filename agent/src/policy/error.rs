//! Errors and warnings of policy loading. Every one carries the file and the line in that file, so
//! `ferry policy lint` output and agent logs point straight at the YAML to fix.

use std::{fmt, path::PathBuf};

use super::PolicyId;

/// A place in the policy input: the file (or the origin given to `parse_str`) and a 1-based line
/// in that whole file, not in the YAML document that contains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub origin: String,
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.origin, self.line)
    }
}

/// Why policies could not be loaded. Loading is all-or-nothing: a half-read policy set could drop
/// a DENY policy and so widen access, which the caller must never enforce.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A field an AuthorizationPolicy does not have: most often a typo, which Ferry refuses rather
    /// than silently ignoring a condition the author meant to apply.
    #[error("{at}:{column}: unknown field `{field}` in {path} (expected one of {expected})")]
    UnknownField {
        at: Location,
        column: usize,
        /// Where the field sits in the document, e.g. `spec.rules[0].from[0].source`.
        path: String,
        field: String,
        expected: String,
    },
    /// Malformed YAML, or a value of the wrong type or format (CIDR, port, action…).
    #[error("{at}:{column}: {message}")]
    Yaml {
        at: Location,
        column: usize,
        message: String,
    },
    /// A well-formed document that is not a valid policy (missing namespace, empty source…).
    #[error("{at}: {field}: {message}")]
    Invalid {
        at: Location,
        field: String,
        message: String,
    },
    #[error("{at}: policy {id} is defined twice (first at {first})")]
    Duplicate {
        at: Location,
        id: PolicyId,
        first: Location,
    },
}

impl PolicyError {
    /// The line in the file, where the error has one (I/O errors do not).
    pub fn location(&self) -> Option<&Location> {
        match self {
            PolicyError::Io { .. } => None,
            PolicyError::UnknownField { at, .. }
            | PolicyError::Yaml { at, .. }
            | PolicyError::Invalid { at, .. }
            | PolicyError::Duplicate { at, .. } => Some(at),
        }
    }
}

/// Something loaded but worth a human's attention: a skipped document or policy, or a field Ferry
/// cannot enforce at L4 and how it was handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub at: Location,
    /// The policy concerned; `None` for a document skipped before it was read as a policy.
    pub policy: Option<PolicyId>,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.policy {
            Some(id) => write!(f, "{}: policy {id}: {}", self.at, self.message),
            None => write!(f, "{}: {}", self.at, self.message),
        }
    }
}

/// Rewrites serde_yaml's error into one located in the whole file. serde_yaml only sees one
/// document at a time here, so both its `location()` and the "line N column M" it prints inside
/// the message (libyaml adds a second one for the context) count from the document's start.
pub(super) fn from_yaml(origin: &str, line_offset: usize, err: &serde_yaml::Error) -> PolicyError {
    let (line, column) = err.location().map_or((line_offset + 1, 0), |l| {
        (l.line() + line_offset, l.column())
    });
    let at = Location {
        origin: origin.to_owned(),
        line,
    };
    let message = strip_own_location(&shift_lines(&err.to_string(), line_offset), line, column);
    if let Some((path, field, expected)) = parse_unknown_field(&message) {
        return PolicyError::UnknownField {
            at,
            column,
            path,
            field,
            expected,
        };
    }
    PolicyError::Yaml {
        at,
        column,
        message,
    }
}

/// Adds `offset` to every "line N" in a serde_yaml/libyaml message.
fn shift_lines(message: &str, offset: usize) -> String {
    const KEY: &str = "line ";
    let mut out = String::with_capacity(message.len() + 8);
    let mut rest = message;
    while let Some(pos) = rest.find(KEY) {
        let after = &rest[pos + KEY.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        out.push_str(&rest[..pos + KEY.len()]);
        match after[..digits].parse::<usize>() {
            Ok(n) if digits > 0 => out.push_str(&(n.saturating_add(offset)).to_string()),
            _ => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// The error's own position is already in the `file:line:column:` prefix; repeating it in the
/// message would only make lint output harder to read.
fn strip_own_location(message: &str, line: usize, column: usize) -> String {
    let suffix = format!(" at line {line} column {column}");
    match message.find(&suffix) {
        Some(pos) => format!("{}{}", &message[..pos], &message[pos + suffix.len()..]),
        None => message.to_owned(),
    }
}

/// Recognises serde's "`path: `unknown field `x`, expected one of `a`, `b`" so the error can name
/// the field as data rather than only as text.
fn parse_unknown_field(message: &str) -> Option<(String, String, String)> {
    const KEY: &str = "unknown field `";
    let pos = message.find(KEY)?;
    let path = message[..pos].trim_end().trim_end_matches(':').to_owned();
    let after = &message[pos + KEY.len()..];
    let end = after.find('`')?;
    let field = after[..end].to_owned();
    let expected = after[end + 1..]
        .trim_start_matches(',')
        .trim()
        .trim_start_matches("expected one of ")
        .trim_start_matches("expected ")
        .to_owned();
    let path = if path.is_empty() {
        "the document".to_owned()
    } else {
        path
    };
    Some((path, field, expected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_lines_moves_every_line_number() {
        assert_eq!(
            shift_lines(
                "bad at line 3 column 4, while parsing at line 1 column 1",
                10
            ),
            "bad at line 13 column 4, while parsing at line 11 column 1"
        );
        assert_eq!(shift_lines("no numbers, line x", 5), "no numbers, line x");
    }

    #[test]
    fn unknown_field_message_is_split() {
        let (path, field, expected) = parse_unknown_field(
            "spec.rules[0]: unknown field `form`, expected one of `from`, `to`, `when`",
        )
        .unwrap();
        assert_eq!(path, "spec.rules[0]");
        assert_eq!(field, "form");
        assert_eq!(expected, "`from`, `to`, `when`");
    }
}
