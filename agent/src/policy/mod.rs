//! L4 authorization: Istio `AuthorizationPolicy` (security.istio.io v1 and v1beta1) evaluated on
//! connections, as Istio ambient's ztunnel does, with the differences below.
//!
//! Loading ([`PolicySet::load_dir`], [`PolicySet::load_path`], [`PolicySet::parse_str`]) is
//! all-or-nothing and strict: any unknown field under `spec` is an error naming file, line and
//! field, because an ignored typo (`notPrincipal`) would silently widen access. [`lint`] reports
//! every error and warning instead of stopping at the first.
//!
//! Decisions ([`PolicySet::evaluate`]) follow Istio: any matching DENY denies; otherwise, if no
//! ALLOW policy applies to the destination workload, the connection is allowed; otherwise it is
//! allowed only if an ALLOW policy matches. AUDIT and dry-run (`istio.io/dry-run: "true"`)
//! policies are evaluated and reported in the [`Decision`] but never enforced, and do not count
//! as an ALLOW policy applying.
//!
//! Choices where Istio's behaviour does not carry over to an L4 agent:
//! - HTTP-only fields (hosts, methods, paths, requestPrincipals, remoteIpBlocks, their `not`
//!   forms, `when` keys such as `request.headers[...]`) never widen access. An ALLOW rule holding
//!   any of them matches nothing (as in ambient). In DENY, CUSTOM and AUDIT rules they count as
//!   matched, so the rule applies on its L4 part alone, and a rule left with no L4 condition
//!   applies to every connection in the policy's scope. That is stricter than ztunnel, which
//!   drops such DENY rules and so lets through traffic the author meant to deny.
//! - CUSTOM delegates to an external authorizer that Ferry does not have. Allowing would fail
//!   open, so a CUSTOM policy is enforced like a DENY policy (HTTP-only conditions counted as
//!   matched): connections matching its L4 part are denied.
//! - Only `kind: AuthorizationPolicy` documents are read. Other kinds are skipped with a warning,
//!   so a policy file may also hold, say, the namespace it needs. An `AuthorizationPolicy` with
//!   another apiVersion, a misspelt kind differing only in case, a `kind: List` or a document
//!   without `kind` is an error: skipping it could drop a DENY policy.
//! - Policies with `targetRef`/`targetRefs` are for waypoints and gateways: skipped with a
//!   warning.
//! - `metadata.namespace` is required (no defaulting), and two policies with the same
//!   `namespace/name` are an error.
//! - `serviceAccounts: [name]` means the account `name` in the policy's own namespace; wildcards
//!   are not accepted there.
//! - Istio's validation errors are errors here too: a `from` entry without a source field, a `to`
//!   entry without an operation field, a `when` without values, an unknown `when` key.

mod compile;
mod error;
mod load;
mod matcher;
mod model;

#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, fmt, net::IpAddr, path::Path, sync::Arc};

pub use error::{Location, PolicyError, Warning};

use crate::identity::Identity;
use matcher::{Attributes, Rule};

/// The root namespace of a default Istio install, whose policies apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// `namespace/name` of a policy. Cheap to clone: decisions carry it on every connection.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId {
    full: Arc<str>,
    slash: usize,
}

impl PolicyId {
    pub fn new(namespace: &str, name: &str) -> Self {
        PolicyId {
            full: format!("{namespace}/{name}").into(),
            slash: namespace.len(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.full[..self.slash]
    }

    pub fn name(&self) -> &str {
        &self.full[self.slash + 1..]
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyId({})", self.full)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    /// Evaluated and reported, never enforced.
    Audit,
    /// Enforced as DENY (fail closed): see the module documentation.
    Custom,
}

impl Action {
    /// Whether a match of an enforced policy with this action denies the connection.
    fn denies(self) -> bool {
        matches!(self, Action::Deny | Action::Custom)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        })
    }
}

/// `selector.matchLabels`, never empty (an empty selector selects everything and is stored as
/// no selector).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(BTreeMap<String, String>);

impl Selector {
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// Which workloads a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// A policy in the root namespace: every namespace.
    Mesh { selector: Option<Selector> },
    Namespace {
        namespace: String,
        selector: Option<Selector>,
    },
}

impl Scope {
    pub fn applies_to(&self, workload: &WorkloadRef<'_>) -> bool {
        let (namespace_ok, selector) = match self {
            Scope::Mesh { selector } => (true, selector),
            Scope::Namespace {
                namespace,
                selector,
            } => (namespace == workload.namespace, selector),
        };
        namespace_ok && selector.as_ref().is_none_or(|s| s.selects(workload.labels))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Mesh { selector: None } => f.write_str("mesh-wide"),
            Scope::Mesh { selector: Some(s) } => {
                write!(f, "workloads labelled {s} in every namespace")
            }
            Scope::Namespace {
                namespace,
                selector: None,
            } => write!(f, "namespace {namespace}"),
            Scope::Namespace {
                namespace,
                selector: Some(s),
            } => write!(f, "workloads labelled {s} in namespace {namespace}"),
        }
    }
}

/// One loaded policy. Read-only: built by loading, inspected by the CLI.
#[derive(Debug, Clone)]
pub struct Policy {
    id: PolicyId,
    at: Location,
    action: Action,
    dry_run: bool,
    scope: Scope,
    rules: Vec<Rule>,
    warnings: Vec<String>,
}

impl Policy {
    pub fn id(&self) -> &PolicyId {
        &self.id
    }

    /// Where the policy's document starts.
    pub fn location(&self) -> &Location {
        &self.at
    }

    pub fn action(&self) -> Action {
        self.action
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// What Ferry could not enforce as written, and how it handled it.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The first matching rule, if any.
    fn matching_rule(&self, attributes: &Attributes<'_>) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(attributes))
    }
}

/// One line for `ferry policy list`: `shop/allow-cart ALLOW namespace shop, 1 rule`.
impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.rules.len();
        write!(
            f,
            "{} {}{} {}, {n} rule{}",
            self.id,
            self.action,
            if self.dry_run { " (dry-run)" } else { "" },
            self.scope,
            if n == 1 { "" } else { "s" }
        )?;
        if !self.warnings.is_empty() {
            write!(f, ", {} warning(s)", self.warnings.len())?;
        }
        Ok(())
    }
}

/// The destination workload of a connection.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadRef<'a> {
    pub namespace: &'a str,
    /// Pod name; not used for matching, only for the caller's logs.
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// A connection to authorize.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The peer's verified identity; `None` for plaintext (unauthenticated) connections, which
    /// match no `principals`/`namespaces`/`serviceAccounts`, not even `"*"`, and meet every
    /// `not` form of them.
    pub source: Option<&'a Identity>,
    pub source_ip: IpAddr,
    pub destination: WorkloadRef<'a>,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

/// Why a connection is allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Rule `rule` (0-based) of a DENY (or CUSTOM) policy matched.
    DeniedBy {
        policy: PolicyId,
        rule: usize,
    },
    AllowedBy {
        policy: PolicyId,
        rule: usize,
    },
    /// No enforced ALLOW policy applies to the destination: open by default.
    NoAllowPolicy,
    /// ALLOW policies apply to the destination but none matched.
    NoAllowMatch,
}

impl Reason {
    pub fn allowed(&self) -> bool {
        matches!(self, Reason::AllowedBy { .. } | Reason::NoAllowPolicy)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::DeniedBy { policy, rule } => write!(f, "denied by policy {policy} rule {rule}"),
            Reason::AllowedBy { policy, rule } => {
                write!(f, "allowed by policy {policy} rule {rule}")
            }
            Reason::NoAllowPolicy => f.write_str("allowed: no ALLOW policy applies"),
            Reason::NoAllowMatch => f.write_str("denied: no ALLOW policy matched"),
        }
    }
}

/// The evaluation of a policy that is reported but not enforced (AUDIT or dry-run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub policy: PolicyId,
    pub action: Action,
    /// The first matching rule (0-based); `None` when no rule matched.
    pub rule: Option<usize>,
}

impl Match {
    pub fn matched(&self) -> bool {
        self.rule.is_some()
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule {
            Some(rule) => write!(f, "{} {} matched rule {rule}", self.action, self.policy),
            None => write!(f, "{} {} did not match", self.action, self.policy),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    /// Every dry-run policy applying to the destination, matched or not.
    pub dry_run: Vec<Match>,
    /// Every enforced AUDIT policy applying to the destination, matched or not.
    pub audit: Vec<Match>,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.reason.allowed()
    }
}

/// `denied by policy shop/deny-intruder rule 0; dry-run: DENY shop/x matched rule 1`
impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reason)?;
        for (label, list) in [("dry-run", &self.dry_run), ("audit", &self.audit)] {
            if !list.is_empty() {
                write!(f, "; {label}: ")?;
                for (i, m) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{m}")?;
                }
            }
        }
        Ok(())
    }
}

/// A set of loaded policies. Immutable and cheap to clone: hot reload builds a new set and swaps
/// it in while connections keep evaluating the old one.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    policies: Arc<Vec<Policy>>,
}

/// A successfully loaded set and what deserves a human's attention in it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub set: PolicySet,
    pub warnings: Vec<Warning>,
}

impl PolicySet {
    /// Loads the `*.yaml`/`*.yml` files of a directory (see [`PolicySet::load_path`]).
    pub fn load_dir(dir: &Path, root_namespace: &str) -> Result<Loaded, PolicyError> {
        let mut builder = load::Builder::default();
        builder.read_dir(dir, root_namespace);
        finish(builder)
    }

    /// Loads one file, or the `*.yaml`/`*.yml` files of a directory in name order (not
    /// recursing; symlinks followed, hidden entries such as a ConfigMap's `..data` skipped).
    /// Returns the first error in file order.
    pub fn load_path(path: &Path, root_namespace: &str) -> Result<Loaded, PolicyError> {
        let mut builder = load::Builder::default();
        builder.read_path(path, root_namespace);
        finish(builder)
    }

    /// Parses YAML text (one or more documents). `origin` names it in errors and warnings.
    pub fn parse_str(
        origin: &str,
        text: &str,
        root_namespace: &str,
    ) -> Result<Loaded, PolicyError> {
        let mut builder = load::Builder::default();
        builder.read_str(origin, text, root_namespace);
        finish(builder)
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Policies in load order (file name, then position in the file).
    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.policies.iter()
    }

    pub fn get(&self, id: &PolicyId) -> Option<&Policy> {
        self.policies.iter().find(|p| &p.id == id)
    }

    /// Decides a connection. When several policies match, the reason cites the first in load
    /// order.
    pub fn evaluate(&self, request: &Request<'_>) -> Decision {
        let attributes = Attributes::of(request);
        let mut denied = None;
        let mut allowed = None;
        let mut allow_applies = false;
        let mut dry_run = Vec::new();
        let mut audit = Vec::new();
        for policy in self
            .policies
            .iter()
            .filter(|p| p.scope.applies_to(&request.destination))
        {
            let rule = policy.matching_rule(&attributes);
            let report = || Match {
                policy: policy.id.clone(),
                action: policy.action,
                rule,
            };
            if policy.dry_run {
                dry_run.push(report());
                continue;
            }
            match policy.action {
                Action::Audit => audit.push(report()),
                action if action.denies() => {
                    if let (None, Some(rule)) = (&denied, rule) {
                        denied = Some(Reason::DeniedBy {
                            policy: policy.id.clone(),
                            rule,
                        });
                    }
                }
                _ => {
                    allow_applies = true;
                    if let (None, Some(rule)) = (&allowed, rule) {
                        allowed = Some(Reason::AllowedBy {
                            policy: policy.id.clone(),
                            rule,
                        });
                    }
                }
            }
        }
        let reason = denied.or(allowed).unwrap_or(if allow_applies {
            Reason::NoAllowMatch
        } else {
            Reason::NoAllowPolicy
        });
        Decision {
            reason,
            dry_run,
            audit,
        }
    }
}

fn finish(builder: load::Builder) -> Result<Loaded, PolicyError> {
    if let Some(first) = builder.errors.into_iter().next() {
        return Err(first);
    }
    Ok(Loaded {
        set: PolicySet {
            policies: Arc::new(builder.policies),
        },
        warnings: builder.warnings,
    })
}

/// Outcome of `ferry policy lint`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LintReport {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    /// Policies read successfully (counted even when other documents have errors).
    pub policies: usize,
}

impl LintReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty() && self.warnings.is_empty()
    }
}

/// Checks a file or directory as the agent would load it, reporting every error rather than the
/// first.
pub fn lint(path: &Path, root_namespace: &str) -> LintReport {
    let mut builder = load::Builder::default();
    builder.read_path(path, root_namespace);
    LintReport {
        errors: builder.errors.iter().map(ToString::to_string).collect(),
        warnings: builder.warnings.iter().map(ToString::to_string).collect(),
        policies: builder.policies.len(),
    }
}

/// A digest of the policy files in `dir` (names and contents, through symlinks), to notice changes
/// cheaply — including the kubelet's atomic `..data` symlink swap of a mounted ConfigMap. `None` when
/// the directory cannot be read.
pub fn fingerprint(dir: &std::path::Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| {
            let n = n.to_string_lossy();
            !n.starts_with('.') && (n.ends_with(".yaml") || n.ends_with(".yml"))
        })
        .collect();
    names.sort();
    let mut h = std::hash::DefaultHasher::new();
    for n in names {
        n.hash(&mut h);
        // An unreadable file (a dangling link mid-swap) still changes the digest.
        std::fs::read(dir.join(&n)).ok().hash(&mut h);
    }
    Some(h.finish())
}
