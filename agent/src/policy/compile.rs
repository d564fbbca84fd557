//! From the YAML model to a compiled [`Policy`]: scope, action, dry-run, and what happens to the
//! fields Ferry cannot enforce at L4.

use super::{
    Action, Policy, PolicyId, Scope, Selector,
    error::{Location, PolicyError},
    matcher::{Check, Clause, Matcher, Rule},
    model::{self, ConditionKind, ConditionValues, RawAction},
};

pub(super) const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

pub(super) enum Outcome {
    Policy(Policy),
    /// A policy deliberately not loaded; the string says why.
    Skipped(PolicyId, String),
}

pub(super) fn compile(
    doc: model::Document,
    at: &Location,
    root_namespace: &str,
) -> Result<Outcome, PolicyError> {
    let invalid = |field: &str, message: &str| PolicyError::Invalid {
        at: at.clone(),
        field: field.to_owned(),
        message: message.to_owned(),
    };
    let metadata = doc
        .metadata
        .ok_or_else(|| invalid("metadata", "is required"))?;
    let name = metadata
        .name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("metadata.name", "is required"))?;
    // A policy without a namespace has no scope; guessing `default` could apply it to the wrong
    // workloads, so this is an error rather than kubectl's defaulting.
    let namespace = metadata
        .namespace
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("metadata.namespace", "is required"))?;
    if name.contains('/') || namespace.contains('/') {
        return Err(invalid("metadata", "name and namespace cannot contain '/'"));
    }
    let id = PolicyId::new(&namespace, &name);
    let mut warnings = Vec::new();

    let dry_run = match metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
    {
        None => false,
        Some(value) => match parse_bool(value) {
            Some(b) => b,
            None => {
                // Istio enforces a policy whose dry-run annotation it cannot parse; so do we.
                warnings.push(format!(
                    "annotation {DRY_RUN_ANNOTATION} has value {value:?}, not a boolean: the \
                     policy is enforced"
                ));
                false
            }
        },
    };

    let spec = doc.spec.unwrap_or(model::Spec {
        selector: None,
        target_ref: None,
        target_refs: None,
        rules: None,
        action: None,
        provider: None,
    });
    if spec.target_ref.is_some() || spec.target_refs.is_some() {
        return Ok(Outcome::Skipped(
            id,
            "has targetRef/targetRefs: it applies to waypoints or gateways, not to Ferry's \
             workload policy; skipped"
                .to_owned(),
        ));
    }

    let action = match spec.action.unwrap_or(RawAction::Allow) {
        RawAction::Allow => Action::Allow,
        RawAction::Deny => Action::Deny,
        RawAction::Audit => Action::Audit,
        RawAction::Custom => {
            let provider = spec
                .provider
                .as_ref()
                .and_then(|p| p.name.as_deref())
                .map_or_else(String::new, |name| format!(" (provider {name})"));
            warnings.push(format!(
                "action CUSTOM{provider} needs an external authorizer, which Ferry does not \
                 have: the policy is enforced as DENY for connections matching its L4 \
                 conditions (fail closed)"
            ));
            Action::Custom
        }
    };

    let selector = spec
        .selector
        .and_then(|s| s.match_labels)
        .filter(|labels| !labels.is_empty())
        .map(Selector);
    let scope = if namespace == root_namespace {
        Scope::Mesh { selector }
    } else {
        Scope::Namespace {
            namespace: namespace.clone(),
            selector,
        }
    };

    let rules = spec
        .rules
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, rule)| compile_rule(i, rule, action, &namespace, at, &mut warnings))
        .collect::<Result<Vec<_>, _>>()?;
    if rules.is_empty() && action == Action::Allow {
        warnings.push(
            "ALLOW policy without rules: it matches nothing, so it denies every connection to \
             the workloads it selects"
                .to_owned(),
        );
    }

    Ok(Outcome::Policy(Policy {
        id,
        at: at.clone(),
        action,
        dry_run,
        scope,
        rules,
        warnings,
    }))
}

/// Go's `strconv.ParseBool`, which Istio uses for the dry-run annotation.
fn parse_bool(value: &serde_yaml::Value) -> Option<bool> {
    match value {
        serde_yaml::Value::Bool(b) => Some(*b),
        serde_yaml::Value::String(s) => match s.as_str() {
            "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
            "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn compile_rule(
    index: usize,
    rule: model::Rule,
    action: Action,
    namespace: &str,
    at: &Location,
    warnings: &mut Vec<String>,
) -> Result<Rule, PolicyError> {
    let invalid = |field: String, message: &str| PolicyError::Invalid {
        at: at.clone(),
        field,
        message: message.to_owned(),
    };
    // Paths of the HTTP-only fields met in this rule, for the warning.
    let mut http = Vec::new();

    let mut from = Vec::new();
    for (j, entry) in rule.from.unwrap_or_default().into_iter().enumerate() {
        let path = format!("spec.rules[{index}].from[{j}].source");
        let source = entry
            .source
            .ok_or_else(|| invalid(path.clone(), "is required"))?;
        from.push(
            compile_source(source, namespace, &path, &mut http).ok_or_else(|| {
                invalid(
                    path.clone(),
                    "must set at least one field (Istio rejects it too)",
                )
            })?,
        );
    }

    let mut to = Vec::new();
    for (j, entry) in rule.to.unwrap_or_default().into_iter().enumerate() {
        let path = format!("spec.rules[{index}].to[{j}].operation");
        let operation = entry
            .operation
            .ok_or_else(|| invalid(path.clone(), "is required"))?;
        to.push(
            compile_operation(operation, &path, &mut http).ok_or_else(|| {
                invalid(
                    path.clone(),
                    "must set at least one field (Istio rejects it too)",
                )
            })?,
        );
    }

    let mut when = Vec::new();
    for (j, condition) in rule.when.unwrap_or_default().into_iter().enumerate() {
        match condition.kind {
            ConditionKind::Http => http.push(format!(
                "spec.rules[{index}].when[{j}] (key {})",
                condition.key
            )),
            ConditionKind::L4 { values, not_values } => {
                when.extend(values.map(|v| Check::positive(condition_matcher(v))));
                when.extend(not_values.map(|v| Check::negative(condition_matcher(v))));
            }
        }
    }

    let compiled = Rule::Match {
        from,
        to,
        when: Clause(when),
    };
    if http.is_empty() {
        return Ok(compiled);
    }
    let fields = http.join(", ");
    Ok(match action {
        // Istio ambient drops such a rule; granting on its L4 half would allow what the author
        // restricted to, say, GET requests.
        Action::Allow => {
            warnings.push(format!(
                "rule {index} uses HTTP-only fields that Ferry cannot enforce at L4 ({fields}): \
                 this ALLOW rule matches nothing"
            ));
            Rule::Never
        }
        // Counting an unknowable condition as met makes DENY (and fail-closed CUSTOM) stricter,
        // never looser; AUDIT over-reports rather than misses.
        Action::Deny | Action::Custom | Action::Audit => {
            let verb = match action {
                Action::Audit => "records",
                _ => "denies",
            };
            if compiled.is_unconditional() {
                warnings.push(format!(
                    "rule {index} uses HTTP-only fields that Ferry cannot enforce at L4 \
                     ({fields}) and has no L4 condition left: it {verb} every connection the \
                     policy applies to"
                ));
            } else {
                warnings.push(format!(
                    "rule {index} uses HTTP-only fields that Ferry cannot enforce at L4 \
                     ({fields}): they count as matched, so the rule {verb} on its L4 part alone"
                ));
            }
            compiled
        }
    })
}

fn some_nonempty<T>(list: Option<Vec<T>>) -> Option<Vec<T>> {
    list.filter(|l| !l.is_empty())
}

/// `None` when the source sets no field at all.
fn compile_source(
    s: model::Source,
    namespace: &str,
    path: &str,
    http: &mut Vec<String>,
) -> Option<Clause> {
    let mut checks = Vec::new();
    let mut any_field = false;
    let pats = |l: Option<Vec<model::Pattern>>| {
        some_nonempty(l).map(|l| l.into_iter().map(|p| p.0).collect::<Vec<_>>())
    };
    let accounts = |l: Option<Vec<model::ServiceAccountRef>>| {
        some_nonempty(l).map(|l| {
            Matcher::ServiceAccount(
                l.into_iter()
                    .map(|a| (a.namespace.unwrap_or_else(|| namespace.to_owned()), a.name))
                    .collect(),
            )
        })
    };
    let ips = |l: Option<Vec<model::IpBlock>>| {
        some_nonempty(l).map(|l| Matcher::SourceIp(l.into_iter().map(|b| b.0).collect()))
    };
    for (matcher, negated) in [
        (pats(s.principals).map(Matcher::Principal), false),
        (pats(s.not_principals).map(Matcher::Principal), true),
        (pats(s.namespaces).map(Matcher::Namespace), false),
        (pats(s.not_namespaces).map(Matcher::Namespace), true),
        (accounts(s.service_accounts), false),
        (accounts(s.not_service_accounts), true),
        (ips(s.ip_blocks), false),
        (ips(s.not_ip_blocks), true),
    ] {
        if let Some(m) = matcher {
            any_field = true;
            checks.push(Check {
                negated,
                matcher: m,
            });
        }
    }

    for (name, list) in [
        ("requestPrincipals", s.request_principals),
        ("notRequestPrincipals", s.not_request_principals),
        ("remoteIpBlocks", s.remote_ip_blocks),
        ("notRemoteIpBlocks", s.not_remote_ip_blocks),
    ] {
        if some_nonempty(list).is_some() {
            any_field = true;
            http.push(format!("{path}.{name}"));
        }
    }
    any_field.then_some(Clause(checks))
}

/// `None` when the operation sets no field at all.
fn compile_operation(o: model::Operation, path: &str, http: &mut Vec<String>) -> Option<Clause> {
    let mut checks = Vec::new();
    let mut any_field = false;
    let ports = |l: Option<Vec<model::Port>>| {
        some_nonempty(l).map(|l| Matcher::DestinationPort(l.into_iter().map(|p| p.0).collect()))
    };
    for (matcher, negated) in [(ports(o.ports), false), (ports(o.not_ports), true)] {
        if let Some(m) = matcher {
            any_field = true;
            checks.push(Check {
                negated,
                matcher: m,
            });
        }
    }
    for (name, list) in [
        ("hosts", o.hosts),
        ("notHosts", o.not_hosts),
        ("methods", o.methods),
        ("notMethods", o.not_methods),
        ("paths", o.paths),
        ("notPaths", o.not_paths),
    ] {
        if some_nonempty(list).is_some() {
            any_field = true;
            http.push(format!("{path}.{name}"));
        }
    }
    any_field.then_some(Clause(checks))
}

fn condition_matcher(values: ConditionValues) -> Matcher {
    match values {
        ConditionValues::SourceIp(v) => Matcher::SourceIp(v),
        ConditionValues::SourceNamespace(v) => Matcher::Namespace(v),
        ConditionValues::SourcePrincipal(v) => Matcher::Principal(v),
        ConditionValues::DestinationIp(v) => Matcher::DestinationIp(v),
        ConditionValues::DestinationPort(v) => Matcher::DestinationPort(v),
    }
}
