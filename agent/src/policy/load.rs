//! Reading policy files: YAML documents, files, ConfigMap-style directories.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use super::{
    Policy, PolicyId,
    compile::{self, Outcome},
    error::{self, Location, PolicyError, Warning},
    model,
};

const KIND: &str = "AuthorizationPolicy";
const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// Accumulates everything read so far. Errors do not stop reading, so that `lint` can report them
/// all; loading for enforcement refuses the result if there is any.
#[derive(Default)]
pub(super) struct Builder {
    pub policies: Vec<Policy>,
    pub warnings: Vec<Warning>,
    pub errors: Vec<PolicyError>,
    seen: HashMap<PolicyId, Location>,
}

impl Builder {
    pub(super) fn read_path(&mut self, path: &Path, root_namespace: &str) {
        match fs::metadata(path) {
            Ok(meta) if meta.is_dir() => self.read_dir(path, root_namespace),
            Ok(_) => self.read_file(path, root_namespace),
            Err(source) => self.errors.push(PolicyError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Reads the `*.yaml`/`*.yml` files of `dir` (not its subdirectories), in name order.
    ///
    /// A mounted ConfigMap looks like `policy.yaml -> ..data/policy.yaml`, `..data -> ..2024_…`,
    /// `..2024_…/policy.yaml`: following symlinks and skipping hidden entries reads each policy
    /// exactly once, through the stable name.
    pub(super) fn read_dir(&mut self, dir: &Path, root_namespace: &str) {
        let io_error = |path: &Path, source| PolicyError::Io {
            path: path.to_owned(),
            source,
        };
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => return self.errors.push(io_error(dir, e)),
        };
        let mut files: Vec<PathBuf> = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => return self.errors.push(io_error(dir, e)),
            };
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let is_yaml = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            );
            if !is_yaml {
                continue;
            }
            // fs::metadata follows the symlink; a dangling one (ConfigMap mid-update) is an
            // error so that the caller keeps its previous policies and retries.
            match fs::metadata(&path) {
                Ok(meta) if meta.is_file() => files.push(path),
                Ok(_) => self.warnings.push(Warning {
                    at: Location {
                        origin: path.display().to_string(),
                        line: 1,
                    },
                    policy: None,
                    message: "not a regular file; skipped".to_owned(),
                }),
                Err(e) => self.errors.push(io_error(&path, e)),
            }
        }
        files.sort();
        for file in files {
            self.read_file(&file, root_namespace);
        }
    }

    fn read_file(&mut self, path: &Path, root_namespace: &str) {
        match fs::read_to_string(path) {
            Ok(text) => self.read_str(&path.display().to_string(), &text, root_namespace),
            Err(source) => self.errors.push(PolicyError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub(super) fn read_str(&mut self, origin: &str, text: &str, root_namespace: &str) {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for doc in split_documents(text) {
            self.read_document(origin, doc, root_namespace);
        }
    }

    fn read_document(&mut self, origin: &str, doc: Chunk<'_>, root_namespace: &str) {
        let yaml_error = |e: &serde_yaml::Error| error::from_yaml(origin, doc.line_offset, e);
        let at = Location {
            origin: origin.to_owned(),
            line: doc.first_content_line(),
        };
        // Untyped pass first: decides whether this document is ours before the strict typed pass
        // could complain about, say, a Deployment's spec.
        let value: serde_yaml::Value = match serde_yaml::from_str(doc.text) {
            Ok(v) => v,
            Err(e) => return self.errors.push(yaml_error(&e)),
        };
        if value.is_null() {
            return; // empty document, e.g. a trailing `---`
        }
        let field = |name: &str| value.get(name).and_then(serde_yaml::Value::as_str);
        let (kind, api_version) = (field("kind"), field("apiVersion"));
        let invalid = |field: &str, message: String| PolicyError::Invalid {
            at: at.clone(),
            field: field.to_owned(),
            message,
        };
        match kind {
            Some(KIND) => {}
            // Skipping an almost-policy could drop a DENY; make the author fix it.
            Some(k) if k.eq_ignore_ascii_case(KIND) || k == "List" => {
                return self.errors.push(invalid(
                    "kind",
                    format!("{k:?} is not supported: write one AuthorizationPolicy per document"),
                ));
            }
            Some(k) => {
                return self.warnings.push(Warning {
                    at,
                    policy: None,
                    message: format!("kind {k} is not an AuthorizationPolicy; document skipped"),
                });
            }
            None => {
                return self.errors.push(invalid(
                    "kind",
                    "is missing: not a Kubernetes object".to_owned(),
                ));
            }
        }
        match api_version {
            Some(v) if API_VERSIONS.contains(&v) => {}
            other => {
                return self.errors.push(invalid(
                    "apiVersion",
                    format!(
                        "{} is not supported (expected {})",
                        other.map_or_else(|| "missing".to_owned(), |v| format!("{v:?}")),
                        API_VERSIONS.join(" or ")
                    ),
                ));
            }
        }
        let typed: model::Document = match serde_yaml::from_str(doc.text) {
            Ok(d) => d,
            Err(e) => return self.errors.push(yaml_error(&e)),
        };
        match compile::compile(typed, &at, root_namespace) {
            Err(e) => self.errors.push(e),
            Ok(Outcome::Skipped(id, message)) => self.warnings.push(Warning {
                at,
                policy: Some(id),
                message,
            }),
            Ok(Outcome::Policy(policy)) => {
                if let Some(first) = self.seen.get(&policy.id) {
                    return self.errors.push(PolicyError::Duplicate {
                        at,
                        id: policy.id.clone(),
                        first: first.clone(),
                    });
                }
                self.seen.insert(policy.id.clone(), at.clone());
                self.warnings
                    .extend(policy.warnings.iter().map(|message| Warning {
                        at: at.clone(),
                        policy: Some(policy.id.clone()),
                        message: message.clone(),
                    }));
                self.policies.push(policy);
            }
        }
    }
}

/// One YAML document of a file and where it starts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Chunk<'a> {
    pub text: &'a str,
    /// Lines of the file before `text`: added to serde_yaml's document-relative line numbers.
    pub line_offset: usize,
}

impl Chunk<'_> {
    /// 1-based file line of the document's first line with content, to point at a policy.
    fn first_content_line(&self) -> usize {
        let skip = self
            .text
            .lines()
            .take_while(|l| {
                let t = l.trim();
                t.is_empty() || t.starts_with('#') || is_separator(l)
            })
            .count();
        self.line_offset + skip + 1
    }
}

fn is_separator(line: &str) -> bool {
    marker(line, "---")
}

fn is_end_marker(line: &str) -> bool {
    marker(line, "...")
}

fn marker(line: &str, m: &str) -> bool {
    line.strip_prefix(m)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

/// Splits a multi-document file. A `---` or `...` at column 0 always ends a document in YAML (it
/// cannot occur inside a scalar), so splitting on lines is exact. Each document is parsed on its
/// own so that one broken document does not hide errors in the others, and a first untyped pass
/// can pick out the AuthorizationPolicies before the strict one.
pub(super) fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start = 0; // byte offset of the current document
    let mut start_line = 0;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if is_separator(line) {
            // The `---` line stays with the document it opens (it may carry content: `--- {}`).
            chunks.push(Chunk {
                text: &text[start..offset],
                line_offset: start_line,
            });
            start = offset;
            start_line = i;
        } else if is_end_marker(line) {
            chunks.push(Chunk {
                text: &text[start..offset],
                line_offset: start_line,
            });
            start = offset + line.len();
            start_line = i + 1;
        }
        offset += line.len();
    }
    chunks.push(Chunk {
        text: &text[start..],
        line_offset: start_line,
    });
    chunks.retain(|c| !c.text.trim().is_empty());
    chunks
}
